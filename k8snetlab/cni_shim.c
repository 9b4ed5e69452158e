/* The thin CNI plugin executable (k8snetlab): see k8snetlab/cni_server.py.
 *
 * Installed once per plugin type as <cni dir>/bin/<type>. It forwards the CNI request (the
 * CNI_* environment and stdin) to the CNI server of the node whose network namespace it runs
 * in, <cni dir>/run/<namespace inode>.sock, and prints the server's answer with its exit
 * status. Where no server listens, it executes the full plugin program <cni dir>/bin/.full/<type>
 * with stdin untouched, so it is a complete CNI plugin either way.
 *
 * Request: {"type":"<type>","env":{"CNI_...":"..."}}\n<stdin bytes>
 * Answer:  <exit status>\n<stdout bytes>
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

struct buf { char *p; size_t n, cap; };

static void put(struct buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) { perror("cni shim: realloc"); exit(1); }
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void put_json_string(struct buf *b, const char *s) {
    put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = c; put(b, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); put(b, esc, 6); }
        else put(b, (const char *)&c, 1);
    }
    put(b, "\"", 1);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    (void)argc;
    char exe[PATH_MAX], dir[PATH_MAX], type[NAME_MAX + 1], path[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len < 0) { perror("cni shim: /proc/self/exe"); return 1; }
    exe[len] = 0;
    snprintf(type, sizeof type, "%s", basename(strdup(exe)));
    snprintf(dir, sizeof dir, "%s", dirname(strdup(exe)));          /* <cni dir>/bin */

    struct stat ns;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (fd < 0 || stat("/proc/self/ns/net", &ns) != 0 ||
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s/../run/%lu.sock", dir,
                 (unsigned long)ns.st_ino) >= (int)sizeof sa.sun_path ||
        connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        /* no server for this namespace: be the plugin ourselves */
        snprintf(path, sizeof path, "%s/.full/%s", dir, type);
        argv[0] = path;
        execv(path, argv);
        fprintf(stderr, "cni shim: cannot execute %s: %s\n", path, strerror(errno));
        return 1;
    }

    struct buf req = {0};
    put(&req, "{\"type\":", 8);
    put_json_string(&req, type);
    put(&req, ",\"env\":{", 8);
    int first = 1;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) != 0) continue;
        char *eq = strchr(*e, '=');
        if (!eq) continue;
        char *key = strndup(*e, (size_t)(eq - *e));
        if (!first) put(&req, ",", 1);
        first = 0;
        put_json_string(&req, key);
        put(&req, ":", 1);
        put_json_string(&req, eq + 1);
        free(key);
    }
    put(&req, "}}\n", 3);
    char chunk[65536];
    ssize_t r;
    while ((r = read(0, chunk, sizeof chunk)) != 0) {
        if (r < 0) { if (errno == EINTR) continue; perror("cni shim: stdin"); return 1; }
        put(&req, chunk, (size_t)r);
    }
    if (write_all(fd, req.p, req.n) != 0) { perror("cni shim: send"); return 1; }
    shutdown(fd, SHUT_WR);

    struct buf ans = {0};
    while ((r = read(fd, chunk, sizeof chunk)) != 0) {
        if (r < 0) { if (errno == EINTR) continue; perror("cni shim: receive"); return 1; }
        put(&ans, chunk, (size_t)r);
    }
    char *nl = ans.n ? memchr(ans.p, '\n', ans.n) : NULL;
    if (!nl) { fprintf(stderr, "cni shim: the CNI server of this node closed without an answer\n"); return 1; }
    *nl = 0;
    int rc = atoi(ans.p);
    size_t off = (size_t)(nl - ans.p) + 1;
    if (write_all(1, ans.p + off, ans.n - off) != 0) { perror("cni shim: stdout"); return 1; }
    return rc;
}
