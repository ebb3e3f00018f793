"""Run an API-format prompt through ComfyUI's own validator and executor, without a server."""
from __future__ import annotations

import asyncio
import uuid


class ServerStub:
    """The few attributes `execution.PromptExecutor` uses from `server.PromptServer`: it records
    every message the executor would have sent to the browser."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class PromptFailed(AssertionError):
    pass


def validate(prompt: dict) -> tuple:
    import execution

    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run_prompt(prompt: dict, extra_data: dict | None = None):
    """Validate, then execute `prompt`. Returns (executor, history_result). Raises PromptFailed
    with ComfyUI's own error report when validation or execution fails."""
    import execution

    valid, error, outputs, node_errors = validate(prompt)
    if not valid:
        raise PromptFailed(f"validate_prompt rejected the prompt: {error} {node_errors}")
    executor = execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, str(uuid.uuid4()), extra_data or {}, outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise PromptFailed(f"execution failed: {errors}")
    return executor, executor.history_result
