#!/usr/bin/env python3
"""A TCP load balancer in front of the replicas, as a Kubernetes Service is to its pods.

    proxy.py PORT_FILE HOST:PORT...

Listens on 127.0.0.1 (an ephemeral port, written to PORT_FILE once it listens) and sends each
new connection to the next backend in turn, skipping backends that refuse it (a replica that is
draining or restarting). Bytes pass unchanged both ways; a connection ends when either side
closes it.
"""
import asyncio
import itertools
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    port_file = sys.argv[1]
    backends = [(host, int(port)) for host, port in (a.rsplit(":", 1) for a in sys.argv[2:])]
    turn = itertools.cycle(range(len(backends)))

    async def handle(client_reader, client_writer):
        for _ in range(3 * len(backends)):
            host, port = backends[next(turn)]
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
                break
            except (OSError, asyncio.TimeoutError):
                continue
        else:
            client_writer.close()
            return
        server_reader, server_writer = upstream
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    with open(port_file, "w") as out:
        out.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


asyncio.run(main())
