"""CPython's own test file for concurrent.futures, vendored unmodified (see LICENSE here).

``test_concurrent_futures_3_11_2.py`` is ``Lib/test/test_concurrent_futures.py`` of CPython
v3.11.2, byte for byte. ``tests/test_executor_contract.py`` runs its applicable test classes
against aioforward's pools; this package only holds the file.
"""
