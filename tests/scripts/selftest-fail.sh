# Harness self-test: one check fails, so the run must be judged failed.
. /tests/lib.sh
pass selftest-ok
fail selftest-deliberate "this failure is the point of the self-test"
finish
