"""The launchers ``hydra/launcher=basic`` and ``joblib`` resolve to under ``mla_analysis.run`` (Hydra only
instantiates plugins defined under ``hydra_plugins``; the work is done in ``mla_analysis.runner.launcher``)."""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from mla_analysis.runner.launcher import launch_isolated, prepare_jobs


class ValidatingBasicLauncher(BasicLauncher):
    """Hydra's sequential launcher, after every job's config of the batch is validated."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        prepare_jobs(self, job_overrides, initial_job_idx)
        return super().launch(job_overrides, initial_job_idx)


class IsolatedJoblibLauncher(JoblibLauncher):
    """The joblib launcher with one loky worker process per job: a worker that dies takes no other job with it."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return launch_isolated(self, job_overrides, initial_job_idx)
