"""The seed's adding job on Faust (faust-streaming 0.15.3), the optional peer of the peers bench
(benches/peers.rs): reads JSON {"a": .., "b": ..} and writes a + b as a JSON number.

    python adding.py BOOTSTRAP INPUT OUTPUT APPLICATION_ID GUARANTEE

GUARANTEE is at_least_once or exactly_once. Every other setting is Faust's default, but its web
server is off. Stops on SIGTERM.
"""

import sys

import faust

broker, input_name, output_name, app_id, guarantee = sys.argv[1:6]

app = faust.App(
    app_id,
    broker=f"kafka://{broker}",
    processing_guarantee=guarantee,
    web_enabled=False,
)


class Add(faust.Record, serializer="json"):
    a: int
    b: int


source = app.topic(input_name, value_type=Add)
sink = app.topic(output_name, value_type=int, value_serializer="json")


@app.agent(source, sink=[sink])
async def adding(stream):
    async for value in stream:
        yield value.a + value.b


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
