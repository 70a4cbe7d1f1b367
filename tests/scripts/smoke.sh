. /tests/lib.sh
check insmod insmod /lib/modules/uxen.ko log_e9=1 debug=1
uxenctl run /guests/hello
echo "rc=$?"
uxenctl run /guests/exitcode
echo "rc=$?"
uxenctl stats --json
uxenctl list
finish
