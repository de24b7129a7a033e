"""A mock TemperFS: Temper's OData API for the Workspaces and Files the old
``sandbox_provisioner`` module writes (TEMPERFS.md beside this file lists those requests).

    with MockTemperFSServer() as fs:
        fs.url                          # a client's temper_api_url
        fs.store.entities("File"), fs.store.requests(), fs.stats()

Modules: ``store`` (the records and Temper's answers), ``config``, ``state`` (the records
and the faults), ``stats``, ``app`` (the Starlette routes, the /_mock/ control API),
``server`` (uvicorn in a thread), ``cli``. It runs on its own: anything that needs both
E2B and TemperFS starts both mocks.
"""

from harness.mocks.temperfs.config import TemperFSConfig
from harness.mocks.temperfs.server import MockTemperFSServer
from harness.mocks.temperfs.stats import TemperFSStats
from harness.mocks.temperfs.store import TemperFSStore

__all__ = ["MockTemperFSServer", "TemperFSConfig", "TemperFSStats", "TemperFSStore"]
