"""A daemon agent in its own process, for tests that stop or kill it with real signals.

usage: python -m tests.control.agent_proc ADDRESS DAEMON_ID [DELAY_S]
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from tests.control.helpers import ScriptedHandler, start_agent


async def main() -> None:
    address, daemon_id = sys.argv[1], sys.argv[2]
    delay_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    agent = await start_agent(address, daemon_id, ScriptedHandler(blocking_s=delay_s))
    print("connected", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await agent.close(5)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
