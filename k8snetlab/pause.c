/* The holder of a pod sandbox (k8snetlab): what Kubernetes' pause container is to a pod.
 *
 * Started by the runtime (k8snetlab/pod.py) with no arguments. It leaves the runtime's
 * session, makes a network namespace and a mount namespace of its own, marks every mount in
 * the new mount namespace private (nothing it mounts shows outside), mounts a sysfs that
 * belongs to the new network namespace on /sys (so /sys/class/net lists the pod's
 * interfaces), writes "\001<its PID>\n" on stdout once all of that exists, and then sleeps
 * until a signal ends it. Containers and shells join its namespaces (mnexec -a <PID>).
 * This is what "mnexec -dnp sleep infinity" did, in one exec instead of two.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <sys/mount.h>
#include <unistd.h>

static int fail(const char *what) {
    perror(what);
    return 1;
}

int main(void) {
    if (setsid() < 0)
        return fail("pause: setsid");
    if (unshare(CLONE_NEWNET | CLONE_NEWNS) < 0)
        return fail("pause: unshare");
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return fail("pause: make / private");
    if (mount("sysfs", "/sys", "sysfs", 0, NULL) < 0)
        return fail("pause: mount sysfs");
    if (printf("\001%d\n", (int)getpid()) < 0 || fflush(stdout) != 0)
        return fail("pause: stdout");
    for (;;)
        pause();
}
