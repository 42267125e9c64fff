"""An embedded MQTT broker for the all-in-one demo when no broker is installed.

Mosquitto (or a clustered broker) is what a site or a fleet runs; this exists
only so ``aidc demo`` works on a bare machine with nothing but Python. It is
amqtt (pure-Python asyncio), which has no shared subscriptions: services that
run against it set ``shared_group = None``.

Run as ``python -m installer.embedded_broker --port 1883``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

logger = logging.getLogger(__name__)


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    from amqtt.broker import Broker  # optional dependency: the [demo] extra

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 10000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    logger.info("embedded broker listening on %s:%s", host, port)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
