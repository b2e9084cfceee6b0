"""vLLM general plugin: registers `BranchdConnector` by name in every vLLM process.

Declared as the `vllm.general_plugins` entry point `branchd_kv`, so that an engine
configured with `kv_connector="BranchdConnector"` alone finds it.
"""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(
            "BranchdConnector", "branching.kv.connector", "BranchdConnector"
        )
    except ValueError:
        pass  # already registered: vLLM loads plugins once per process, tests more often
