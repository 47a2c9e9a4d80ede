#!/usr/bin/env python3
"""Smoke test for a Kafka-protocol broker (e.g. the nisshi broker from scripts/kafka.sh).

Creates a topic, produces 3 keyed messages (idempotent, acks=all), consumes them back through a
consumer group and checks keys, values and per-partition order.

    pip install confluent-kafka
    dir=$(mktemp -d); brokers=$(scripts/kafka.sh start "$dir")
    scripts/kafka-smoke.py "$brokers"
    scripts/kafka.sh stop "$dir"

Exits 0 on success, 1 on failure.
"""

import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

TIMEOUT_SECS = 30


def main() -> int:
    brokers = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    topic = f"smoke-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()

    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    futures[topic].result(timeout=TIMEOUT_SECS)
    md = admin.list_topics(topic=topic, timeout=TIMEOUT_SECS)
    partitions = len(md.topics[topic].partitions)
    print(f"created topic {topic} with {partitions} partitions")

    sent = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(3)]
    delivered = []

    def on_delivery(err, msg):
        if err is not None:
            raise KafkaException(err)
        delivered.append((msg.key(), msg.value(), msg.partition(), msg.offset()))

    producer = Producer(
        {"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all"}
    )
    for key, value in sent:
        producer.produce(topic, key=key, value=value, headers=[("smoke", b"1")],
                         on_delivery=on_delivery)
    remaining = producer.flush(TIMEOUT_SECS)
    if remaining or len(delivered) != len(sent):
        print(f"FAIL: only {len(delivered)} of {len(sent)} messages acknowledged")
        return 1
    for key, value, partition, offset in delivered:
        print(f"produced {key.decode()}={value.decode()} -> partition {partition} offset {offset}")

    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"{topic}-group",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        # nisshi answers a fetch only when fetch.wait.max.ms runs out (see KAFKA.md).
        "fetch.wait.max.ms": 10,
    })
    consumer.subscribe([topic])
    received = []
    deadline = time.monotonic() + TIMEOUT_SECS
    while len(received) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            print(f"consumer error: {msg.error()}")
            continue
        received.append(msg)
        headers = dict(msg.headers() or [])
        print(f"consumed {msg.key().decode()}={msg.value().decode()} "
              f"<- partition {msg.partition()} offset {msg.offset()} headers {headers}")
    if received:
        consumer.commit(asynchronous=False)
    consumer.close()

    got = sorted((m.key(), m.value()) for m in received)
    if got != sorted(sent):
        print(f"FAIL: consumed {got}, expected {sorted(sent)}")
        return 1
    by_partition = {}
    for m in received:
        by_partition.setdefault(m.partition(), []).append(m.offset())
    if any(offs != sorted(offs) for offs in by_partition.values()):
        print(f"FAIL: offsets out of order within a partition: {by_partition}")
        return 1

    admin.delete_topics([topic])[topic].result(timeout=TIMEOUT_SECS)
    print(f"OK: {len(received)} messages round-tripped through {brokers} "
          f"in {time.monotonic() - t0:.2f}s (topic deleted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
