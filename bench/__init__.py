"""`make bench`: the gateway benchmark. Not part of the test suite; see docs/performance.md."""
