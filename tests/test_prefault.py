"""Parameter memory of a waiting CPU server allocated ahead of the first push (server/prefault.py)."""

import torch

from sglang_ckpt_plugin.server.prefault import PAGE, cpu_ranges, populate, populate_in_background

MiB = 1 << 20


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_populate_allocates_untouched_parameters_and_changes_no_value():
    model = torch.nn.Sequential(torch.nn.Linear(2048, 4096, bias=False), torch.nn.Linear(4096, 2048, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(2048 * 4096, dtype=torch.float32).reshape(4096, 2048))
        fresh = torch.nn.Parameter(torch.empty(64 * MiB, dtype=torch.uint8), requires_grad=False)  # never touched
    model.register_parameter("fresh", fresh)
    expected = model[0].weight.clone()
    before = rss_anon()
    done, problem = populate(cpu_ranges(model))
    assert problem == ""
    assert done >= 64 * MiB + 2 * 2048 * 4096 * 4
    assert rss_anon() - before >= 60 * MiB  # the untouched tensor's pages exist now
    assert torch.equal(model[0].weight, expected)


def test_ranges_are_page_aligned_and_merged():
    base = torch.zeros(10 * PAGE, dtype=torch.uint8)
    model = torch.nn.Module()
    model.register_buffer("a", base[: 3 * PAGE + 5])
    model.register_buffer("b", base[2 * PAGE :])  # the same storage: one range
    model.register_buffer("c", torch.zeros(PAGE, dtype=torch.uint8))
    ranges = cpu_ranges(model)
    assert all(start % PAGE == 0 and length % PAGE == 0 for start, length in ranges)
    assert (base.data_ptr() - base.data_ptr() % PAGE) in [start for start, _ in ranges]
    assert all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:]))  # sorted, no overlap: "b" merged into "a"
    assert sum(length for _, length in ranges) >= 11 * PAGE


def test_background_population_ends_and_a_model_without_cpu_memory_starts_nothing():
    model = torch.nn.Linear(8, 8)
    thread = populate_in_background(model)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert populate_in_background(torch.nn.Module()) is None
