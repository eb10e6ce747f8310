import re

from benchmarks.step_overhead import main


def test_reports_a_prefill_and_a_decode_step_time(capsys):
    main(["--num-layers", "2", "--num-requests", "3", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    times = re.search(r"prefill step ([\d.]+) ms, decode step ([\d.]+) ms", out)
    assert times is not None, out
    assert all(float(t) > 0 for t in times.groups())
