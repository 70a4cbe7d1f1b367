// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel APIs that the Linux 6.12 Rust bindings lack: the misc device,
 * anonymous-inode descriptors, per-CPU calls, page allocation, the RAM map,
 * module parameters and a kthread. Each is a thin pass-through; every
 * decision is taken on the Rust side (`shim.rs` wraps these once).
 */
#include <linux/acpi.h>
#include <linux/anon_inodes.h>
#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/kthread.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/sched/signal.h>
#include <linux/smp.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <asm/fpu/api.h>
#include <asm/tsc.h>

#include "shim.h"

static int fail_cpu = -1;
module_param(fail_cpu, int, 0444);
MODULE_PARM_DESC(fail_cpu, "fault injection: the CPU index whose entry fails (-1: none)");

static bool require_iommu;
module_param(require_iommu, bool, 0444);
MODULE_PARM_DESC(require_iommu, "refuse to load without DMA protection (VT-d)");

static bool debug;
module_param(debug, bool, 0444);
MODULE_PARM_DESC(debug, "enable the debug ioctls the tests use");

static bool iommu_only;
module_param(iommu_only, bool, 0444);
MODULE_PARM_DESC(iommu_only, "start only DMA protection, without VMX (testing on machines without VT-x)");

static bool log_e9;
module_param(log_e9, bool, 0444);
MODULE_PARM_DESC(log_e9, "also write the hypervisor's log to I/O port 0xe9 (emulators' debug console)");

static unsigned long rsdp;
module_param(rsdp, ulong, 0444);
MODULE_PARM_DESC(rsdp, "physical address of the ACPI RSDP, overriding the DMAR table the kernel found (0: none)");

int uxen_param_fail_cpu(void) { return fail_cpu; }
bool uxen_param_require_iommu(void) { return require_iommu; }
bool uxen_param_debug(void) { return debug; }
bool uxen_param_iommu_only(void) { return iommu_only; }
bool uxen_param_log_e9(void) { return log_e9; }
unsigned long uxen_param_rsdp(void) { return rsdp; }

#ifdef CONFIG_INTEL_IOMMU
extern int intel_iommu_enabled;
bool uxen_host_iommu_enabled(void) { return intel_iommu_enabled != 0; }
#else
bool uxen_host_iommu_enabled(void) { return false; }
#endif
/*
 * The DMAR table that the kernel's own ACPI found (from the RSDP the firmware
 * handed it: EFI's configuration table on UEFI, the BIOS areas otherwise).
 * Copies it into buf if it fits in max bytes; returns its length, or 0 when
 * the kernel has none (no CONFIG_ACPI, acpi=off, no VT-d).
 */
unsigned long uxen_shim_acpi_dmar(void *buf, unsigned long max)
{
#ifdef CONFIG_ACPI
	struct acpi_table_header *t;
	unsigned long len;

	if (acpi_disabled || ACPI_FAILURE(acpi_get_table(ACPI_SIG_DMAR, 0, &t)))
		return 0;
	len = t->length;
	if (buf && len <= max)
		memcpy(buf, t, len);
	acpi_put_table(t);
	return len;
#else
	return 0;
#endif
}

/* Whether Linux runs with 5-level paging (CR4.LA57). */
bool uxen_shim_la57(void) { return pgtable_l5_enabled(); }

static int dev_open(struct inode *inode, struct file *file)
{
	void *priv = NULL;
	long ret = uxen_dev_open(&priv);

	if (ret)
		return ret;
	file->private_data = priv;
	return 0;
}

static int dev_release(struct inode *inode, struct file *file)
{
	uxen_dev_release(file->private_data);
	return 0;
}

static long dev_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	return uxen_dev_ioctl(file->private_data, cmd, arg);
}

static const struct file_operations dev_fops = {
	.owner = THIS_MODULE,
	.open = dev_open,
	.release = dev_release,
	.unlocked_ioctl = dev_ioctl,
	.compat_ioctl = dev_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice uxen_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "uxen",
	.fops = &dev_fops,
	.mode = 0600,
};

int uxen_shim_misc_register(void) { return misc_register(&uxen_misc); }
void uxen_shim_misc_deregister(void) { misc_deregister(&uxen_misc); }

static int vm_release(struct inode *inode, struct file *file)
{
	uxen_vm_release(file->private_data);
	return 0;
}

static long vm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	return uxen_vm_ioctl(file->private_data, cmd, arg);
}

static const struct file_operations vm_fops = {
	.owner = THIS_MODULE,
	.release = vm_release,
	.unlocked_ioctl = vm_ioctl,
	.compat_ioctl = vm_ioctl,
	.llseek = noop_llseek,
};

/* A new descriptor for a VM; its release calls uxen_vm_release(priv). */
int uxen_shim_vm_fd(void *priv)
{
	return anon_inode_getfd("uxen-vm", &vm_fops, priv, O_RDWR | O_CLOEXEC);
}

void uxen_shim_on_each_cpu(void (*fn)(void *), void *info) { on_each_cpu(fn, info, 1); }
int uxen_shim_smp_call_single(int cpu, void (*fn)(void *), void *info)
{
	return smp_call_function_single(cpu, fn, info, 1);
}
unsigned int uxen_shim_num_online_cpus(void) { return num_online_cpus(); }
unsigned int uxen_shim_num_present_cpus(void) { return num_present_cpus(); }
int uxen_shim_cpu_online(int cpu) { return cpu_online(cpu); }
int uxen_shim_nr_cpu_ids(void) { return nr_cpu_ids; }
int uxen_shim_this_cpu(void) { return raw_smp_processor_id(); }
/* Interrupts off on this CPU (direct calls into the image); returns the flags to restore. */
unsigned long uxen_shim_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}
void uxen_shim_irq_restore(unsigned long flags) { local_irq_restore(flags); }
void uxen_shim_cpus_read_lock(void) { cpus_read_lock(); }
void uxen_shim_cpus_read_unlock(void) { cpus_read_unlock(); }

/* Physically contiguous, zeroed pages from the direct map, or NULL. */
void *uxen_shim_alloc_pages(unsigned int order)
{
	struct page *page = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, order);

	return page ? page_address(page) : NULL;
}
void uxen_shim_free_pages(void *addr, unsigned int order) { free_pages((unsigned long)addr, order); }
u64 uxen_shim_virt_to_phys(const void *addr) { return virt_to_phys((void *)addr); }
void *uxen_shim_phys_to_virt(u64 phys) { return phys_to_virt(phys); }
unsigned long uxen_shim_page_offset(void) { return PAGE_OFFSET; }

struct ram_walk {
	u64 *out;
	int max;
	int n;
};

static int ram_walk_one(struct resource *res, void *arg)
{
	struct ram_walk *w = arg;

	if (w->n < w->max) {
		w->out[2 * w->n] = res->start;
		w->out[2 * w->n + 1] = resource_size(res);
	}
	w->n++;
	return 0;
}

/* System RAM as (base, size) pairs; returns how many ranges exist. */
int uxen_shim_ram_ranges(u64 *out, int max)
{
	struct ram_walk w = { .out = out, .max = max, .n = 0 };

	walk_iomem_res_desc(IORES_DESC_NONE, IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY, 0, -1, &w,
			    ram_walk_one);
	return w.n;
}

void *uxen_shim_kthread_run(int (*fn)(void *), void *data, const char *name)
{
	struct task_struct *t = kthread_run(fn, data, "%s", name);

	return IS_ERR(t) ? NULL : t;
}
int uxen_shim_kthread_stop(void *task) { return kthread_stop(task); }
bool uxen_shim_kthread_should_stop(void) { return kthread_should_stop(); }
void uxen_shim_msleep_interruptible(unsigned int ms) { msleep_interruptible(ms); }
bool uxen_shim_signal_pending(void) { return signal_pending(current); }
void uxen_shim_cond_resched(void) { cond_resched(); }
void uxen_shim_schedule_timeout_interruptible(long jiffies) { schedule_timeout_interruptible(jiffies); }
unsigned long uxen_shim_usecs_to_jiffies(unsigned int us) { return usecs_to_jiffies(us); }

/* Wait queues for idle vCPUs (HLT) and for kicks. */
void *uxen_shim_waitq_new(void)
{
	wait_queue_head_t *wq = kmalloc(sizeof(*wq), GFP_KERNEL);

	if (wq)
		init_waitqueue_head(wq);
	return wq;
}
void uxen_shim_waitq_free(void *wq) { kfree(wq); }
void uxen_shim_waitq_wake(void *wq) { wake_up_interruptible_all((wait_queue_head_t *)wq); }
/* Sleeps until *word != old, a signal, or timeout_ms. */
long uxen_shim_waitq_wait(void *wq, const int *word, int old, unsigned int timeout_ms)
{
	return wait_event_interruptible_timeout(*(wait_queue_head_t *)wq, READ_ONCE(*word) != old,
						msecs_to_jiffies(timeout_ms));
}

/* Physical address of a page of module memory (the trampoline page). */
u64 uxen_shim_vmalloc_to_phys(const void *addr)
{
	return page_to_phys(vmalloc_to_page(addr)) + offset_in_page(addr);
}
int uxen_shim_add_cpu(int cpu) { return add_cpu(cpu); }

/*
 * CPU hotplug: each CPU tells the hypervisor, on itself, as it goes offline
 * and once it is back, so that the hypervisor emulates the INIT and SIPI that
 * bring it back (and leaves the host's APIC alone otherwise).
 */
static int uxen_cpuhp_state = -1;

static int uxen_cpu_online(unsigned int cpu)
{
	uxen_host_cpu_changed(1);
	return 0;
}

static int uxen_cpu_offline(unsigned int cpu)
{
	uxen_host_cpu_changed(0);
	return 0;
}

/* Called with the CPU hotplug lock held (cpus_read_lock). */
int uxen_shim_cpuhp_register(void)
{
	int ret = cpuhp_setup_state_nocalls_cpuslocked(CPUHP_AP_ONLINE_DYN, "uxen:online",
						       uxen_cpu_online, uxen_cpu_offline);

	if (ret < 0)
		return ret;
	uxen_cpuhp_state = ret;
	return 0;
}

void uxen_shim_cpuhp_unregister(void)
{
	if (uxen_cpuhp_state >= 0)
		cpuhp_remove_state_nocalls(uxen_cpuhp_state);
	uxen_cpuhp_state = -1;
}

/*
 * 2^order pages, split so that each can be freed on its own (the hypervisor
 * gives pages back one by one). Not zeroed: the hypervisor scrubs what it
 * takes. Returns the direct-map address or NULL.
 */
void *uxen_shim_alloc_split(unsigned int order)
{
	struct page *page = alloc_pages(GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY, order);

	if (!page)
		return NULL;
	if (order)
		split_page(page, order);
	return page_address(page);
}
void uxen_shim_free_page_phys(u64 phys) { __free_page(pfn_to_page(phys >> PAGE_SHIFT)); }

/* Guests may clobber vector registers: hold them for the kernel around a run. */
void uxen_shim_fpu_begin(void) { kernel_fpu_begin(); }
void uxen_shim_fpu_end(void) { kernel_fpu_end(); }
unsigned int uxen_shim_tsc_khz(void) { return tsc_khz; }
