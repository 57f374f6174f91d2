"""Quality evaluation: task generators, haystacks, LongBench loader and metrics, runner, report."""
