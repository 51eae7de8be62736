"""What /metrics says about the real daemon stays true over time: bounded labels, counters that
never go down, deliveries counted once they happened."""

import itertools
import re
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from .raw import Raw

MiB = 1 << 20


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric in an exposition text, by their sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_thread_cpu_has_the_same_labels_at_every_scrape_and_never_goes_down(daemon, qmp):
    """Each scrape runs in a new thread of the metrics server; a label per thread made a new
    series per scrape (164 in 3 minutes). Now: roles, vCPUs, and 'other' for the rest."""
    qmp("vm-create", name="threads", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": MiB}])
    qmp("sim-workload-start", vm="threads", pages_per_second=2000, vcpus=2)
    qmp("dirty-log-get", vm="threads", slot=0)  # a harvest: the worker pool has a thread
    scrapes = []
    for _ in range(40):
        scrapes.append(samples(daemon.metrics(), "dirtylogd_thread_cpu_seconds_total"))
        time.sleep(0.01)
    labels = [{dict(k)["thread"] for k in scrape} for scrape in scrapes]
    roles = {"main", "worker", "state", "other"}  # state: the VM's record was written
    assert labels[0] == roles | {"threads/vcpu0", "threads/vcpu1"}, labels[0]
    assert all(seen == labels[0] for seen in labels), labels
    for before, after in itertools.pairwise(scrapes):
        went_down = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
        assert not went_down, went_down
    assert max(scrapes[-1].values()) > 0
    qmp("vm-remove", vm="threads")


def test_delivered_pages_and_reads_count_only_answers_that_reached_the_reader(daemon, qmp):
    """An answer the client never received is put back, and not counted: the counters used to
    count it at the take and subtract it at the put-back, going down."""
    qmp("vm-create", name="count", memslots=[{"slot": 0, "guest-phys-addr": 0, "size": 8 << 30}])
    qmp("consumer-add", vm="count", name="mig", initially_set=False)
    qmp("consumer-add", vm="count", name="copy", initially_set=False, manual_protect=True)
    qmp("sim-write-pages", vm="count", gfns=[3, 1 << 20, (2 << 20) - 1], value=1)
    # The base64 answer (~350 KB) outgrows the socket buffers: the client closes mid-write.
    raw = Raw(daemon.socket)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.recv()
    raw.ask({"execute": "qmp_capabilities"})
    raw.send(
        {"execute": "dirty-log-get", "arguments": {"vm": "count", "slot": 0, "consumer": "mig"}}
    )
    time.sleep(0.5)
    raw.close()

    def mig_pending() -> int:
        vm = next(v for v in qmp("query-vms") if v["name"] == "count")
        return next(c["pending-pages"] for c in vm["consumers"] if c["name"] == "mig")

    # The answer is put back once the daemon finds the client gone, which on a loaded machine
    # can be after a fixed sleep: wait for it, or the next GET would race the put-back.
    deadline = time.monotonic() + 30
    while mig_pending() != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mig_pending() == 3

    def counters() -> dict[str, tuple[float, float]]:
        text = daemon.metrics()
        reads = samples(text, "dirtylogd_consumer_reads_total")
        pages = samples(text, "dirtylogd_consumer_delivered_pages_total")
        return {
            dict(k)["consumer"]: (reads[k], pages[k]) for k in reads if dict(k)["vm"] == "count"
        }

    assert counters() == {"default": (0, 0), "mig": (0, 0), "copy": (0, 0)}
    for consumer in ("mig", "copy", "copy"):
        qmp("dirty-log-get", vm="count", slot=0, consumer=consumer, encoding="ranges")
    # copy reads without clearing: its pages stay pending and none are handed over. An answer
    # is counted once the daemon saw its last byte written, which can be just after the client
    # already read it: give the count a moment.
    expected = {"default": (0, 0), "mig": (1, 3), "copy": (2, 0)}
    deadline = time.monotonic() + 10
    while counters() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counters() == expected
    text = daemon.metrics()
    assert re.search(r'dirtylogd_pending_pages\{consumer="copy",vm="count"\} 3\.0', text), text
    qmp("vm-remove", vm="count")
