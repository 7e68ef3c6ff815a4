"""Job ids: UUID4 strings from the OS's CSPRNG, drawn in bulk (no system call per job),
well-formed, distinct, and never shared with a forked child."""

from __future__ import annotations

import os
import uuid

import jobservice


def test_a_million_ids_are_distinct_well_formed_uuid4s():
    ids = [jobservice.new_job_id() for _ in range(1_000_000)]
    assert len(set(ids)) == len(ids)
    for job_id in ids[:: 997]:  # a thousand spread over every batch, parsed in full
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id  # lowercase, hyphenated, 36 characters
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # And every one has the version and variant nibbles, cheaply.
    assert all(len(i) == 36 and i[14] == "4" and i[19] in "89ab" for i in ids)


def test_ids_come_from_one_urandom_call_per_batch(monkeypatch):
    calls = []
    real = os.urandom

    def counting(size):
        calls.append(size)
        return real(size)

    monkeypatch.setattr(os, "urandom", counting)
    jobservice._job_ids.clear()
    for _ in range(3 * jobservice.ID_BATCH):
        jobservice.new_job_id()
    assert calls == [16 * jobservice.ID_BATCH] * 3


def test_a_forked_child_does_not_hand_out_the_parents_ids():
    jobservice._job_ids.clear()
    jobservice.new_job_id()  # the parent now holds 4,095 unused ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "\n".join(jobservice.new_job_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    os.waitpid(pid, 0)
    parent = [jobservice.new_job_id() for _ in range(100)]
    assert len(child) == 100 and set(child).isdisjoint(parent)
