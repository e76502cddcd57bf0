"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a fresh local one.

A bare ``ray.init()`` would try to join whatever cluster ``/tmp/ray/ray_current_cluster`` names (a stale
``ray start`` leaves it behind) and hang or fail; every job connects through here instead. Connecting also
turns Ray Data's own progress bars off (``pipeline.progress.quiet_ray_data``): jobs show their own.

A local Ray starts with its dashboard on 127.0.0.1:8265: Ray Train's placement-group cleaner polls the
state API the dashboard serves (without it, it logs a warning every few seconds), and a person can watch
the job there.
"""

from __future__ import annotations

import os


def connect(num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` if set, else start a local Ray (``num_cpus`` logical CPUs, default: all cores).
    Does not start another when Ray is already initialised in this process. Either way, Ray Data's
    progress bars are turned off for the datasets built afterwards."""
    import ray

    from pipeline.progress import quiet_ray_data

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    quiet_ray_data()
