"""fastnn's benchmark suite (pytest-benchmark), its report and the GPU check; see run.py."""
