// SPDX-License-Identifier: GPL-2.0
/*
 * uxen_probe: what ring 0 of the host sees of VMX. Each probe runs an
 * instruction under an exception-table fix-up and reports whether it
 * faulted. On a CPU without VMX (and under the hypervisor, which must look
 * like one) every VMX instruction raises #UD, CR4.VMXE cannot be set, and
 * IA32_FEATURE_CONTROL refuses writes. VMCALL is the hypervisor's interface:
 * an unknown number comes back with -ENOSYS.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/moduleparam.h>
#include <asm/asm.h>
#include <asm/msr.h>
#include <asm/special_insns.h>

static u64 page[512] __aligned(4096);

#define PROBE(name, insn, ...)                                              \
static bool probe_##name(void)                                              \
{                                                                           \
	asm goto("1: " insn "\n\t"                                          \
		 _ASM_EXTABLE(1b, %l[fault])                                \
		 : : __VA_ARGS__ : "memory", "cc" : fault);                 \
	return false;                                                       \
fault:                                                                      \
	return true;                                                        \
}

PROBE(vmxon, "vmxon %0", "m"(page))
PROBE(vmxoff, "vmxoff")
PROBE(vmclear, "vmclear %0", "m"(page))
PROBE(vmptrld, "vmptrld %0", "m"(page))
PROBE(vmread, "vmread %0, %%rax", "r"(0x681eUL))
PROBE(vmwrite, "vmwrite %%rax, %0", "r"(0x681eUL))
PROBE(vmlaunch, "vmlaunch")
PROBE(invept, "invept %0, %1", "m"(page), "r"(2UL))
PROBE(invvpid, "invvpid %0, %1", "m"(page), "r"(2UL))

static bool probe_cr4_vmxe(void)
{
	unsigned long cr4 = native_read_cr4();

	asm goto("1: mov %0, %%cr4\n\t"
		 _ASM_EXTABLE(1b, %l[fault])
		 : : "r"(cr4 | X86_CR4_VMXE) : "memory" : fault);
	/* It took: put it back. */
	asm volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
	return false;
fault:
	return true;
}

static long vmcall_unknown(void)
{
	unsigned long rax = 0xdead;

	asm volatile("1: vmcall\n\t"
		     "2:\n\t"
		     _ASM_EXTABLE(1b, 2b)
		     : "+a"(rax) : : "rdx", "memory");
	return (long)rax;
}

/*
 * Hostile host hypercalls (module parameters from the test script): a host
 * that owns ring 0 can issue any hypercall with any argument. Each block
 * below names memory the host must not hand over: the hypervisor's region,
 * a guest's frame, the local APIC, an overflowing range. Each result is
 * printed as "hc NAME=VALUE" for the script to compare with the contract
 * (docs/hypercalls.md); nothing here decides what is right.
 */
static unsigned long hv_phys;
module_param(hv_phys, ulong, 0444);
static unsigned long hv_size;
module_param(hv_size, ulong, 0444);
static unsigned long guest_phys;
module_param(guest_phys, ulong, 0444);
static unsigned int vm;
module_param(vm, uint, 0444);

static long hc(unsigned long nr, unsigned long arg, unsigned long len)
{
	unsigned long rax = nr, rdi = arg, rsi = len, rdx;

	asm volatile("1: vmcall\n\t"
		     "2:\n\t"
		     _ASM_EXTABLE(1b, 2b)
		     : "+a"(rax), "+D"(rdi), "+S"(rsi), "=d"(rdx) : : "memory");
	return (long)rax;
}

/* shared_abi::VmLoad */
struct vm_load {
	u32 vm, reserved0;
	u64 gpa, src, len;
};

#define HC_VERSION 0x01
#define HC_STATS 0x02
#define HC_UNLOAD 0x03
#define HC_DONATE 0x04
#define HC_RECLAIM 0x05
#define HC_VM_CREATE 0x10
#define HC_VM_DESTROY 0x11
#define HC_VM_LOAD 0x12
#define HC_VM_RUN 0x15
#define HC_VM_LIST 0x17
#define STATS_SIZE 84760 /* sizeof(shared_abi::HvStats) */

#define REPORT(name, expr) pr_info("uxen_probe: hc %s=%ld\n", name, (long)(expr))

static void hostile_hypercalls(void)
{
	u64 *pg = (u64 *)get_zeroed_page(GFP_KERNEL);
	u64 *pg2 = (u64 *)get_zeroed_page(GFP_KERNEL);
	unsigned long g = guest_phys & PAGE_MASK;
	struct vm_load *l = (struct vm_load *)pg;
	phys_addr_t p, p2;
	bool intact = true;
	int i;

	if (!pg || !pg2) {
		pr_info("uxen_probe: hc no memory\n");
		goto out;
	}
	p = virt_to_phys(pg);
	p2 = virt_to_phys(pg2);
	memset(pg2, 0xa5, PAGE_SIZE);

	REPORT("version-ok", hc(HC_VERSION, p, 32));
	/* Blocks the hypervisor would read or write for the host. */
	REPORT("version@hv", hc(HC_VERSION, hv_phys + PAGE_SIZE, 32));
	REPORT("version@hv-end", hc(HC_VERSION, hv_phys + hv_size - 16, 32));
	REPORT("stats@hv", hc(HC_STATS, hv_phys, STATS_SIZE));
	REPORT("stats@guest", hc(HC_STATS, g, STATS_SIZE));
	REPORT("stats@apic", hc(HC_STATS, 0xfee00000UL, STATS_SIZE));
	REPORT("stats@overflow", hc(HC_STATS, ~0UL - 8, STATS_SIZE));
	REPORT("stats-short", hc(HC_STATS, p, 8));
	REPORT("list@hv", hc(HC_VM_LIST, hv_phys, 88 * 4));
	REPORT("list@guest", hc(HC_VM_LIST, g, 88));
	REPORT("create@hv", hc(HC_VM_CREATE, hv_phys, 56));
	REPORT("create@guest", hc(HC_VM_CREATE, g, 56));
	REPORT("run@hv", hc(HC_VM_RUN, hv_phys, 400));
	REPORT("destroy@guest", hc(HC_VM_DESTROY, g, 8));
	REPORT("reclaim@hv", hc(HC_RECLAIM, hv_phys, PAGE_SIZE));
	REPORT("reclaim@guest", hc(HC_RECLAIM, g, PAGE_SIZE));
	REPORT("reclaim-none", hc(HC_RECLAIM, p, 0));

	/* Donations of memory that is not the host's to give. */
	pg[0] = hv_phys;
	pg[1] = PAGE_SIZE;
	REPORT("donate-hv", hc(HC_DONATE, p, 16));
	pg[0] = g;
	REPORT("donate-guest", hc(HC_DONATE, p, 16));
	pg[0] = 0xfee00000UL;
	REPORT("donate-apic", hc(HC_DONATE, p, 16));
	pg[0] = p2;
	pg[2] = p2;
	pg[3] = PAGE_SIZE;
	REPORT("donate-twice", hc(HC_DONATE, p, 32));
	pg[0] = p2 + 8;
	REPORT("donate-misaligned", hc(HC_DONATE, p, 16));
	pg[0] = p2;
	pg[1] = 0;
	REPORT("donate-empty", hc(HC_DONATE, p, 16));
	pg[1] = 2UL << 30;
	REPORT("donate-huge", hc(HC_DONATE, p, 16));
	REPORT("donate-none", hc(HC_DONATE, p, 0));
	REPORT("donate-too-many", hc(HC_DONATE, p, 16 * 257));
	REPORT("donate-list@hv", hc(HC_DONATE, hv_phys, 16));
	for (i = 0; i < PAGE_SIZE / 8; i++)
		intact &= pg2[i] == 0xa5a5a5a5a5a5a5a5ULL;
	pr_info("uxen_probe: hc refused-donation-page-intact=%d\n", intact);

	/* Loads into a guest from memory the host does not own: a leak. */
	memset(pg, 0, PAGE_SIZE);
	l->vm = vm;
	l->gpa = 0x200000;
	l->len = PAGE_SIZE;
	l->src = hv_phys + PAGE_SIZE;
	REPORT("load-from-hv", hc(HC_VM_LOAD, p, 32));
	l->src = g;
	REPORT("load-from-guest", hc(HC_VM_LOAD, p, 32));
	l->src = 0xfee00000UL;
	REPORT("load-from-apic", hc(HC_VM_LOAD, p, 32));
	l->src = p2;
	l->len = 2 * PAGE_SIZE;
	REPORT("load-long", hc(HC_VM_LOAD, p, 32));
	l->src = p2 + PAGE_SIZE - 100;
	l->len = 200;
	REPORT("load-across-pages", hc(HC_VM_LOAD, p, 32));

	/* Numbers that are not host hypercalls, and leaving VMX with a VM. */
	REPORT("nr-0", hc(0, p, PAGE_SIZE));
	REPORT("nr-0x8", hc(0x8, p, PAGE_SIZE));
	/* HOST_CPU (0x7) with RDI neither 0 nor 1. */
	REPORT("host-cpu-bad", hc(0x7, p, PAGE_SIZE));
	REPORT("nr-0x19", hc(0x19, p, PAGE_SIZE));
	/* VM_IRQ (0x18) with a block of 0xa5 bytes: no such line. */
	REPORT("irq-bad-line", hc(0x18, p2, 16));
	REPORT("nr-0x1000", hc(0x1000, p, PAGE_SIZE));
	REPORT("nr-max", hc(~0UL, p, PAGE_SIZE));
	REPORT("unload-with-vm", hc(HC_UNLOAD, 0, 0));
out:
	if (pg)
		free_page((unsigned long)pg);
	if (pg2)
		free_page((unsigned long)pg2);
}

static int __init probe_init(void)
{
	u64 fc = 0;
	int rd, wr, cap;

	pr_info("uxen_probe: vmxon=%s vmxoff=%s vmclear=%s vmptrld=%s vmread=%s vmwrite=%s vmlaunch=%s invept=%s invvpid=%s\n",
		probe_vmxon() ? "fault" : "ok", probe_vmxoff() ? "fault" : "ok",
		probe_vmclear() ? "fault" : "ok", probe_vmptrld() ? "fault" : "ok",
		probe_vmread() ? "fault" : "ok", probe_vmwrite() ? "fault" : "ok",
		probe_vmlaunch() ? "fault" : "ok", probe_invept() ? "fault" : "ok",
		probe_invvpid() ? "fault" : "ok");
	pr_info("uxen_probe: cr4.vmxe=%s\n", probe_cr4_vmxe() ? "fault" : "ok");
	rd = rdmsrl_safe(MSR_IA32_FEAT_CTL, &fc);
	wr = wrmsrl_safe(MSR_IA32_FEAT_CTL, fc | FEAT_CTL_LOCKED | FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX);
	cap = rdmsrl_safe(MSR_IA32_VMX_BASIC, &(u64){ 0 });
	pr_info("uxen_probe: feature_control=%#llx read=%s write=%s vmx_basic_read=%s\n", fc,
		rd ? "fault" : "ok", wr ? "fault" : "ok", cap ? "fault" : "ok");
	pr_info("uxen_probe: vmcall_unknown=%ld\n", vmcall_unknown());
	if (hv_phys)
		hostile_hypercalls();
	return 0;
}

static void __exit probe_exit(void)
{
}

module_init(probe_init);
module_exit(probe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("uxen-rs test probe: VMX from ring 0 of the host");
