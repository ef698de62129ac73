"""Settings of the test session.

`python -m pytest -q -n 2 --dist loadscope` (README) runs the suite on two pytest-xdist workers,
one module or test class per worker at a time. Each worker then runs torch on one thread (and so
do the train.py processes the tests start): two workers of two threads each would fight over the
two cores of a CI machine. The learning tests, minutes each, are collected first and handed out
first (two units: the Pong world model, then Catch with Rhythm), one to each worker, while the
short tests fill in around them.
"""
import os

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported


def pytest_configure(config):
    # xdist would otherwise hand out the modules with the most tests first, and so the learning
    # tests last, with one worker left idle while the other ends them.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order otherwise
