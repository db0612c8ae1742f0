"""lm-eval integration: the adapter against direct forward passes / Transformer.generate, exported procedural
tasks against the toolkit's own exact-match scoring, the CLI and the probe."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mla_analysis.training.checkpoint import save_checkpoint, save_model_config
from mla_analysis.config import ConfigError, tiny
from mla_analysis.data import DataConfig, build_eval_sets, score_logits
from mla_analysis.data.tasks import IGNORE
from mla_analysis.data.vocab import EOS
from mla_analysis.models.transformer import Transformer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mla_analysis.evaluation.cli import TaskError, answer_spans, export_procedural_tasks, load_tasks, main  # noqa: E402
from mla_analysis.evaluation.lm_eval_model import MLAnalysisLM, ProceduralTokenizer  # noqa: E402

TASKS = ["mqar", "niah_multivalue", "arithmetic"]  # passkey and copy run in the other end-to-end tests


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved tiny MLA run directory (random weights, checkpoint at step 0)."""
    d = tmp_path_factory.mktemp("run")
    model = _model(attention="mla")
    save_model_config(d, model.cfg)
    save_checkpoint(d, model, None, 0, {})
    return d


# ---- tokenizer -----------------------------------------------------------------------------------------
def test_procedural_tokenizer_round_trip_and_unknown_token():
    tok = ProceduralTokenizer(128)
    ids = list(range(128))
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.encode("EOS 7 a w0") == [EOS, 16 + 7, 16 + 10, 32]
    with pytest.raises(ValueError, match="unknown token 'hello'"):
        tok.encode("EOS hello")


# ---- adapter vs direct computation ------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_loglikelihood_equals_forward_pass(attention):
    model = _model(attention=attention)
    lm = MLAnalysisLM(model=model, batch_size=3, device="cpu")
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(32, 128, (n,), generator=g).tolist()  # noqa: E731
    ctxs = [rand(5), rand(5), rand(9), rand(5)]
    conts = [rand(3), rand(1), rand(4), rand(2)]
    reqs = [_req("loglikelihood", lm.tok_decode(c), " " + lm.tok_decode(x)) for c, x in zip(ctxs, conts)]
    reqs.append(_req("loglikelihood", "", lm.tok_decode(conts[0])))  # empty context: EOS stands in
    ctxs.append([EOS])
    conts.append(conts[0])
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (lp, greedy), ctx, cont in zip(got, ctxs, conts):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0], -1)  # (T, V), no cache
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        target = torch.tensor(cont)
        assert lp == pytest.approx(float(logp[pos, target].sum()), abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == target).all())


def test_loglikelihood_greedy_flag_true_for_argmax_continuation():
    model = _model()
    lm = MLAnalysisLM(model=model, device="cpu")
    ctx = [40, 41, 42]
    cont = model.generate(torch.tensor([ctx]), 3)[0].tolist()
    (_, greedy), = lm.loglikelihood([_req("loglikelihood", lm.tok_decode(ctx), " " + lm.tok_decode(cont))], disable_tqdm=True)
    assert greedy


def test_loglikelihood_rolling_windows_beyond_context():
    model = _model(attention="mla", max_seq_len=16)
    lm = MLAnalysisLM(model=model, batch_size=2, device="cpu")
    t = torch.randint(32, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", lm.tok_decode(t))])

    def score(inp, n_last):  # sum log p of the last n_last tokens predicted by one plain forward over inp
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([inp[:-1]]))[0], -1)  # (T-1, V)
        tgt = torch.tensor(inp[1:])
        return float(logp[torch.arange(len(inp) - 1), tgt][-n_last:].sum())

    # lm-eval's disjoint windows for 40 tokens and 16 positions (LM.loglikelihood_rolling docstring):
    # [EOS]+t0..t14 -> t0..t15; [t15]+t16..t30 -> t16..t31; t23..t38 (full context) -> t32..t39
    want = score([EOS] + t[:16], 16) + score(t[15:32], 16) + score(t[23:40], 8)
    assert got == pytest.approx(want, abs=1e-4)
    assert got < 0


def test_generate_until_equals_transformer_generate_and_stops():
    model = _model(attention="mla")
    lm = MLAnalysisLM(model=model, batch_size=4, device="cpu")
    g = torch.Generator().manual_seed(3)
    ctxs = [torch.randint(32, 128, (n,), generator=g).tolist() for n in (6, 6, 9, 6, 3)]
    reqs = [_req("generate_until", lm.tok_decode(c), {"until": [], "max_gen_toks": 6}) for c in ctxs]
    out = lm.generate_until(reqs, disable_tqdm=True)
    refs = [model.generate(torch.tensor([c]), 6)[0].tolist() for c in ctxs]
    for text, ref in zip(out, refs):
        ref_text = lm.tok_decode(ref)
        cut = ref_text.find("EOS")  # the EOS token's text always stops generation
        assert text == (ref_text if cut == -1 else ref_text[:cut].rstrip())
    # stop at a user string: the text of the third greedy token of the first context
    stop = lm.tok_decode(refs[0][2:3])
    (text,) = lm.generate_until([_req("generate_until", lm.tok_decode(ctxs[0]), {"until": [stop], "max_gen_toks": 6})])
    ref_text = lm.tok_decode(refs[0])
    assert text == ref_text[: ref_text.find(stop)].rstrip()
    assert len(text.split()) <= 2


# ---- exported procedural tasks ----------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Knows every eval sequence: predicts the true next token (the target where scored), optionally wrong on some spans."""

    def __init__(self, cfg, sets, corrupt: bool):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.table: dict[tuple, int] = {}
        for x, y in sets.values():
            for xi, yi in zip(x.tolist(), y.tolist()):
                for t in range(len(xi)):
                    nxt = yi[t] if yi[t] != IGNORE else (xi[t + 1] if t + 1 < len(xi) else EOS)
                    if corrupt and yi[t] != IGNORE and (yi[t] + t) % 3 == 0:
                        nxt = 32 + (nxt + 1) % 96  # a wrong answer
                    self.table[tuple(xi[: t + 1])] = nxt

    def new_cache(self, batch_size, max_len):
        return SimpleNamespace(rows=[[] for _ in range(batch_size)], seq_len=0)

    def forward(self, ids, cache=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        for r in range(B):
            hist = (cache.rows[r] if cache is not None else []) + ids[r].tolist()
            start = len(hist) - T
            for t in range(T):
                logits[r, t, self.table.get(tuple(hist[: start + t + 1]), 0)] = 10.0
            if cache is not None:
                cache.rows[r] = hist
        return logits + 0 * self.w


def test_answer_spans():
    # MQAR-like: answers not in the inputs -> separate spans; teacher-forced run with a gap -> two spans
    assert answer_spans([5, 6, 7, 8], [IGNORE, 9, IGNORE, 9]) == [(1, 1), (3, 3)]
    assert answer_spans([1, 2, 3, 4, 5, 6], [IGNORE, 3, 4, IGNORE, 6, IGNORE]) == [(1, 2), (4, 4)]


@pytest.mark.parametrize("corrupt", [False, True])
def test_exported_tasks_exact_match_equals_toolkit_scoring(tmp_path, corrupt):
    data = DataConfig(vocab_size=128, seq_len=128, eval_examples=3, eval_tasks=TASKS)
    sets = {k: v for k, v in build_eval_sets(data).items() if k in TASKS}
    oracle = Oracle(tiny(), sets, corrupt)
    names = export_procedural_tasks(data, TASKS, tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = MLAnalysisLM(model=oracle, batch_size=8, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), task_manager=tm, bootstrap_iters=0)["results"]
    for task, name in names.items():
        x, y = sets[task]
        toolkit = score_logits(oracle(x), y)["exact_match"]  # teacher-forced argmax, one full forward
        assert res[name]["exact_match,none"] == pytest.approx(toolkit)
        if not corrupt:
            assert res[name]["exact_match,none"] == 1.0 and res[name]["span_exact_match,none"] == 1.0
    if corrupt:
        assert min(res[n]["exact_match,none"] for n in names.values()) < 1.0


def test_simple_evaluate_by_name_on_run_dir(run_dir, tmp_path):
    import mla_analysis  # noqa: F401  (registers model="mla_analysis")

    data = DataConfig(vocab_size=128, eval_examples=2)
    export_procedural_tasks(data, ["passkey", "copy"], tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="mla_analysis", model_args=f"pretrained={run_dir}", tasks=["mla_passkey", "mla_copy"],
        task_manager=tm, bootstrap_iters=0, limit=2,
    )["results"]
    assert res["mla_passkey"]["exact_match,none"] < 1.0 and res["mla_copy"]["exact_match,none"] < 1.0


def test_load_tasks_errors_name_the_task(tmp_path):
    (tmp_path / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\ndataset_kwargs: {data_files: {test: %s}}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{x}}'\ndoc_to_target: '{{y}}'\n" % (tmp_path / "missing.jsonl")
    )
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(TaskError, match="unknown lm-eval task 'nosuch'"):
        load_tasks(tm, ["nosuch"])
    with pytest.raises(TaskError, match="'broken_task': dataset could not be loaded") as e:
        load_tasks(tm, ["broken_task"])
    assert "\n" not in str(e.value)


# ---- CLI and probe ------------------------------------------------------------------------------------------
def test_cli_bad_path_exit_2_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "mla_analysis.eval", "--pretrained", str(tmp_path / "nope"), "--tasks", "passkey"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert main(["--pretrained", str(tmp_path), "--tasks", "passkey"]) == 2  # a directory without a model


def test_cli_runs_procedural_tasks(run_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["--pretrained", str(run_dir), "--tasks", "passkey,mla_mqar", "--limit", "3", "--examples", "2",
               "--include_path", str(tmp_path / "tasks"), "--output_path", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert set(rec["results"]) == {"mla_passkey", "mla_mqar"}
    assert rec["n-samples"]["mla_mqar"]["effective"] == 3
    assert "passkey.exact_match" in capsys.readouterr().out
    assert (tmp_path / "tasks" / "mla_passkey.yaml").exists()


def test_probe_via_registry(tmp_path):
    from mla_analysis.probes import run_probes

    model = _model()
    data = DataConfig(vocab_size=128, eval_examples=2)
    out = run_probes(model, {"lm_eval": {"tasks": ["passkey", "arithmetic"], "batch_size": 4}}, data, tmp_path, torch.device("cpu"))
    for task in ("passkey", "arithmetic"):
        x, y = build_eval_sets(DataConfig(vocab_size=128, eval_examples=2, eval_tasks=[task]))[task]
        with torch.no_grad():
            want = score_logits(model(x), y)["exact_match"]
        assert out[f"probe.lm_eval.{task}.exact_match"] == pytest.approx(want)
        assert 0.0 <= out[f"probe.lm_eval.{task}.span_exact_match"] <= 1.0
    assert out["probe.lm_eval.results"]["mla_passkey"]["exact_match,none"] == out["probe.lm_eval.passkey.exact_match"]
    assert (tmp_path / "lm_eval.json").exists() and (tmp_path / "lm_eval_tasks" / "mla_arithmetic.yaml").exists()
    with pytest.raises(ConfigError, match="probe.lm_eval.batch_sizes"):
        run_probes(model, {"lm_eval": {"batch_sizes": 4}}, data, tmp_path, torch.device("cpu"))
    with pytest.raises(ConfigError, match="probe.lm_eval.tasks"):
        run_probes(model, {"lm_eval": {"tasks": []}}, data, tmp_path, torch.device("cpu"))


def test_import_registers_lazily():
    # the model class itself is resolved through the registry in test_simple_evaluate_by_name_on_run_dir
    code = (
        "import sys, mla_analysis; assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules\n"
        "from lm_eval.api.registry import model_registry\n"
        "print('mla_analysis' in model_registry, 'hf' in model_registry, 'torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "False"]
