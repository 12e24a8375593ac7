"""Test helpers for megafs and for anyone writing an object store.

* :func:`check_store` -- the :class:`~megafs.stores.base.ObjectStore` contract as a
  test suite to run against any store.
* :class:`~megafs.testing.faults.FaultyStore` -- a store wrapper that injects
  failures, latency and damaged reads.
"""

from megafs.testing.faults import FaultyStore as FaultyStore
from megafs.testing.storecheck import StoreFactory as StoreFactory
from megafs.testing.storecheck import check_store as check_store
