"""The paper's tables as data, the runner, the report, the parity study. May import every other wing."""
