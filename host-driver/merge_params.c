// SPDX-License-Identifier: GPL-2.0
/*
 * The module parameters of background re-merging and of its fault
 * injection, writable at run time under /sys/module/uxen/parameters/.
 * A write is checked here (a batch of 0, an interval beyond an hour, or
 * anything that is not a number is refused with EINVAL) and then reported
 * to the Rust side, which takes every decision (merge.rs).
 */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

void uxen_params_changed(void);
unsigned int uxen_param_merge_interval_ms(void);
unsigned int uxen_param_merge_batch(void);
bool uxen_param_debug_drop_shootdown_acks(void);

static unsigned int merge_interval_ms;
static unsigned int merge_batch = 32;
static bool debug_drop_shootdown_acks;

#define UXEN_MERGE_INTERVAL_MAX 3600000u
#define UXEN_MERGE_BATCH_MAX 65536u

static int set_uint_in(const char *val, const struct kernel_param *kp, unsigned int lo, unsigned int hi)
{
	unsigned int v;
	int r = kstrtouint(val, 0, &v);

	if (r)
		return -EINVAL;
	if (v < lo || v > hi)
		return -EINVAL;
	WRITE_ONCE(*(unsigned int *)kp->arg, v);
	uxen_params_changed();
	return 0;
}

static int set_interval(const char *val, const struct kernel_param *kp)
{
	return set_uint_in(val, kp, 0, UXEN_MERGE_INTERVAL_MAX);
}

static int set_batch(const char *val, const struct kernel_param *kp)
{
	return set_uint_in(val, kp, 1, UXEN_MERGE_BATCH_MAX);
}

static int set_drop_acks(const char *val, const struct kernel_param *kp)
{
	int r = param_set_bool(val, kp);

	if (!r)
		uxen_params_changed();
	return r;
}

static const struct kernel_param_ops interval_ops = { .set = set_interval, .get = param_get_uint };
static const struct kernel_param_ops batch_ops = { .set = set_batch, .get = param_get_uint };
static const struct kernel_param_ops drop_acks_ops = { .set = set_drop_acks, .get = param_get_bool };

module_param_cb(merge_interval_ms, &interval_ops, &merge_interval_ms, 0644);
MODULE_PARM_DESC(merge_interval_ms, "background re-merging: milliseconds between wake-ups (0: off, the default; at most 3600000)");
module_param_cb(merge_batch, &batch_ops, &merge_batch, 0644);
MODULE_PARM_DESC(merge_batch, "background re-merging: guest pages examined per wake-up (1-65536, default 32)");
module_param_cb(debug_drop_shootdown_acks, &drop_acks_ops, &debug_drop_shootdown_acks, 0644);
MODULE_PARM_DESC(debug_drop_shootdown_acks, "fault injection (with debug=1): CPUs ignore TLB shootdowns, which then time out");

unsigned int uxen_param_merge_interval_ms(void) { return READ_ONCE(merge_interval_ms); }
unsigned int uxen_param_merge_batch(void) { return READ_ONCE(merge_batch); }
bool uxen_param_debug_drop_shootdown_acks(void) { return READ_ONCE(debug_drop_shootdown_acks); }
