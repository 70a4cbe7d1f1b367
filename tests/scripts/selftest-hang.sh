# Harness self-test: the machine never reaches its end marker, so the run
# must time out and be judged failed.
. /tests/lib.sh
pass selftest-before-hang
while :; do :; done
