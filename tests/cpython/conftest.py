"""The vendored CPython file is a library of test classes for tests/test_executor_contract.py.

Collected on its own it would test the standard library's executors (fork ones included), so
pytest must not pick it up by its ``test_*.py`` name.
"""

collect_ignore = ["test_concurrent_futures_3_11_2.py"]
