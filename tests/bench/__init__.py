"""Unit tests of the benchmark harness's pure parts (bench/): no servers, no load, no clock."""
