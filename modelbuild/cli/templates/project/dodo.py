"""doit entry point: every target in targets/*.toml is a doit task of the same name.

    doit                      build the default targets
    doit <target>             build one target and what it needs
    doit list | info <t> | clean <t> | forget <t> | -n 2
"""

from pathlib import Path

from modelbuild.tasks import doit_config, tasks_for_project

ROOT = Path(__file__).resolve().parent
DOIT_CONFIG = doit_config(ROOT)
task_modelbuild = tasks_for_project(ROOT)
