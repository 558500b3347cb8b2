/*
 * sse_client: a cheap epoll load generator for Server-Sent Events.
 *
 * Opens N streams to HOST:PORT PATH (HTTP/1.1, one GET each), at most
 * --window connections waiting for their response headers at a time, and
 * checks that every one got "HTTP/1.1 200". Then it prints
 *
 *     ready connected=N failed=F connect_ms=T
 *
 * and waits for a line on stdin (so that the harness can measure the
 * server's memory with every stream open). For each --item, one round:
 * it opens one extra connection, takes the CLOCK_MONOTONIC time, sends
 * POST --trigger-path {"item_id": ITEM} on it, and records for every
 * stream the time at which the bytes completing one more occurrence of
 * --marker arrived. A round ends when every stream saw it or after
 * --timeout seconds. It prints per round and over all rounds:
 *
 *     round R item=I status=201 received=N/N p50=.. p90=.. p99=.. max=..
 *     all received=.. p50=.. p90=.. p99=.. max=..         (milliseconds)
 *     cpu_rounds_ms=..
 *
 * Without --item (watch mode) it only records: with --dump FILE, every
 * read of stream 0 is written as (u64 CLOCK_MONOTONIC ns, u32 length,
 * bytes) until stdin closes or says anything; nothing is triggered.
 *
 * Build: gcc -O2 -o sse_client sse_client.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 64
#define STDIN_TAG UINT32_MAX
#define TRIGGER_TAG (UINT32_MAX - 1)

enum { CONNECTING, HEADERS, STREAMING, DEAD };

struct conn {
    int fd;
    int state;
    int seen;            /* marker occurrences so far */
    size_t carry_len;    /* bytes kept to find a marker split by reads */
    char *carry;         /* marker_len - 1 bytes */
    char head[1024];     /* the start of the response, for its status */
    size_t head_len;
};

static const char *host = "127.0.0.1";
static int port;
static const char *path = "/events";
static const char *marker = "event: stock_change";
static const char *trigger_path = "/api/purchase";
static const char *dump_path;
static int n_streams = 1000, window = 500, timeout_s = 10;
static long items[MAX_ITEMS];
static int n_items;
static double gap_s = 0.3;

static struct conn *conns;
static size_t marker_len;
static int ep;
static struct sockaddr_in addr;
static FILE *dump;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int open_socket(int blocking)
{
    int fd = socket(AF_INET, SOCK_STREAM | (blocking ? 0 : SOCK_NONBLOCK),
                    0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void watch(int fd, uint32_t events, uint32_t tag)
{
    struct epoll_event ev = {.events = events, .data.u32 = tag};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

static void start_connect(uint32_t i)
{
    struct conn *c = &conns[i];
    c->fd = open_socket(0);
    c->state = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 &&
        errno != EINPROGRESS)
        die("connect");
    watch(c->fd, EPOLLOUT | EPOLLIN, i);
}

static void kill_conn(struct conn *c)
{
    if (c->state != DEAD) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->state = DEAD;
    }
}

static void send_request(uint32_t i)
{
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Accept: text/event-stream\r\n\r\n", path, host, port);
    struct conn *c = &conns[i];
    if (write(c->fd, req, n) != n) {
        kill_conn(c);
        return;
    }
    c->state = HEADERS;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Count marker occurrences in carry + data; keep the tail as carry. */
static int count_markers(struct conn *c, const char *data, size_t len)
{
    static char *scratch;
    static size_t scratch_cap;
    size_t total = c->carry_len + len;
    if (total > scratch_cap) {
        scratch_cap = total * 2;
        scratch = realloc(scratch, scratch_cap);
        if (!scratch)
            die("realloc");
    }
    memcpy(scratch, c->carry, c->carry_len);
    memcpy(scratch + c->carry_len, data, len);
    int found = 0;
    const char *p = scratch, *end = scratch + total;
    while ((p = memmem(p, end - p, marker, marker_len)) != NULL) {
        found++;
        p += marker_len;
    }
    size_t keep = marker_len - 1;
    if (keep > total)
        keep = total;
    memcpy(c->carry, end - keep, keep);
    c->carry_len = keep;
    return found;
}

/* Read what stream i has; returns marker occurrences found. */
static int read_stream(uint32_t i, int64_t *when)
{
    static char buf[65536];
    struct conn *c = &conns[i];
    int found = 0;
    for (;;) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            kill_conn(c);
            return found;
        }
        if (n < 0)
            return found;
        *when = now_ns();
        if (dump && i == 0) {
            uint64_t t = (uint64_t)*when;
            uint32_t len = (uint32_t)n;
            fwrite(&t, sizeof t, 1, dump);
            fwrite(&len, sizeof len, 1, dump);
            fwrite(buf, 1, n, dump);
            fflush(dump);
        }
        const char *data = buf;
        size_t len = n;
        if (c->state == HEADERS) {
            size_t room = sizeof c->head - 1 - c->head_len;
            size_t take = len < room ? len : room;
            memcpy(c->head + c->head_len, data, take);
            c->head_len += take;
            c->head[c->head_len] = 0;
            char *eoh = strstr(c->head, "\r\n\r\n");
            if (!eoh && c->head_len < sizeof c->head - 1)
                return found;
            if (strncmp(c->head, "HTTP/1.1 200", 12) != 0 || !eoh) {
                kill_conn(c);
                return found;
            }
            c->state = STREAMING;
            size_t used = (eoh + 4 - c->head) - (c->head_len - take);
            data += used;
            len -= used;
        }
        found += count_markers(c, data, len);
    }
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_ms(int64_t *sorted, int n, double p)
{
    if (n == 0)
        return -1;
    int k = (int)(p * n + 0.999999) - 1;  /* nearest rank */
    if (k < 0)
        k = 0;
    if (k >= n)
        k = n - 1;
    return sorted[k] / 1e6;
}

static void print_stats(const char *label, int64_t *lat, int n, int want)
{
    qsort(lat, n, sizeof *lat, cmp_i64);
    printf("%s received=%d/%d p50=%.3f p90=%.3f p99=%.3f max=%.3f\n", label,
           n, want, pct_ms(lat, n, 0.50), pct_ms(lat, n, 0.90),
           pct_ms(lat, n, 0.99), n ? lat[n - 1] / 1e6 : -1.0);
    fflush(stdout);
}

static int alive(void)
{
    int n = 0;
    for (int i = 0; i < n_streams; i++)
        n += conns[i].state == STREAMING;
    return n;
}

/* Connect every stream, `window` at a time; returns how many failed. */
static int connect_all(void)
{
    int next = 0, pending = 0, done = 0, failed = 0;
    struct epoll_event evs[1024];
    int64_t deadline = now_ns() + (int64_t)60 * 1000000000;
    while (done < n_streams && now_ns() < deadline) {
        while (pending < window && next < n_streams) {
            start_connect(next++);
            pending++;
        }
        int n = epoll_wait(ep, evs, 1024, 1000);
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            struct conn *c = &conns[i];
            int before = c->state;
            if (before == CONNECTING) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || evs[k].events & (EPOLLERR | EPOLLHUP))
                    kill_conn(c);
                else
                    send_request(i);
            } else if (before == HEADERS) {
                int64_t t;
                read_stream(i, &t);
            } else if (before == STREAMING) {
                int64_t t;
                c->seen += read_stream(i, &t);
            }
            if ((before == CONNECTING || before == HEADERS) &&
                (c->state == STREAMING || c->state == DEAD)) {
                pending--;
                done++;
                failed += c->state == DEAD;
            }
        }
    }
    return failed + (n_streams - done);
}

/* Open the trigger connection (blocking connect on loopback is instant). */
static int open_trigger(void)
{
    int fd = open_socket(1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect trigger");
    return fd;
}

static int run_round(int round, long item, int64_t *all, int *n_all)
{
    char body[64], req[512];
    int blen = snprintf(body, sizeof body, "{\"item_id\": %ld}", item);
    int rlen = snprintf(req, sizeof req,
                        "POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
                        "Content-Type: application/json\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                        trigger_path, host, port, blen, body);
    int64_t *lat = malloc(sizeof(int64_t) * n_streams);
    int n_lat = 0, want = round + 1, status = 0, target = alive();
    char resp[512];
    size_t resp_len = 0;
    int tfd = open_trigger();
    int64_t t0 = now_ns();
    if (write(tfd, req, rlen) != rlen)
        die("write trigger");
    fcntl(tfd, F_SETFL, fcntl(tfd, F_GETFL) | O_NONBLOCK);
    watch(tfd, EPOLLIN, TRIGGER_TAG);
    struct epoll_event evs[1024];
    int64_t deadline = t0 + (int64_t)timeout_s * 1000000000;
    while ((n_lat < target || tfd >= 0) && now_ns() < deadline) {
        int n = epoll_wait(ep, evs, 1024, 100);
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            if (i == TRIGGER_TAG) {
                ssize_t r = read(tfd, resp + resp_len,
                                 sizeof resp - 1 - resp_len);
                if (r > 0)
                    resp_len += r;
                if (r == 0 || resp_len >= sizeof resp - 1 ||
                    (r < 0 && errno != EAGAIN)) {
                    resp[resp_len] = 0;
                    sscanf(resp, "HTTP/1.1 %d", &status);
                    epoll_ctl(ep, EPOLL_CTL_DEL, tfd, NULL);
                    close(tfd);
                    tfd = -1;
                }
                continue;
            }
            if (i == STDIN_TAG || conns[i].state != STREAMING)
                continue;
            int64_t t;
            int found = read_stream(i, &t);
            if (found) {
                int before = conns[i].seen;
                conns[i].seen += found;
                if (before < want && conns[i].seen >= want)
                    lat[n_lat++] = t - t0;
            }
        }
    }
    if (tfd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, tfd, NULL);
        close(tfd);
    }
    /* a stream that missed this round must not count as late next time */
    for (int i = 0; i < n_streams; i++)
        if (conns[i].seen < want)
            conns[i].seen = want;
    memcpy(all + *n_all, lat, sizeof(int64_t) * n_lat);
    *n_all += n_lat;
    char label[96];
    snprintf(label, sizeof label, "round %d item=%ld status=%d", round + 1,
             item, status);
    print_stats(label, lat, n_lat, n_streams);
    free(lat);
    return n_lat;
}

/* Service the streams (and stdin) for `seconds`, or until stdin speaks. */
static int pump(double seconds, int until_stdin)
{
    struct epoll_event evs[1024];
    int64_t deadline = now_ns() + (int64_t)(seconds * 1e9);
    while (seconds < 0 || now_ns() < deadline) {
        int n = epoll_wait(ep, evs, 1024, 100);
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            if (i == STDIN_TAG) {
                char line[64];
                ssize_t r = read(0, line, sizeof line);
                (void)r;
                if (until_stdin)
                    return 1;
                continue;
            }
            if (conns[i].state == STREAMING) {
                int64_t t;
                conns[i].seen += read_stream(i, &t);
            }
        }
    }
    return 0;
}

static double cpu_ms(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: sse_client --port P [--host H] [--streams N] "
            "[--path /events]\n"
            "       [--marker TEXT] [--item ID]... [--trigger-path P] "
            "[--window W]\n"
            "       [--timeout S] [--gap S] [--dump FILE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int a = 1; a < argc; a++) {
        const char *opt = argv[a];
        if (a + 1 >= argc)
            usage();
        const char *val = argv[++a];
        if (!strcmp(opt, "--host"))
            host = val;
        else if (!strcmp(opt, "--port"))
            port = atoi(val);
        else if (!strcmp(opt, "--streams"))
            n_streams = atoi(val);
        else if (!strcmp(opt, "--path"))
            path = val;
        else if (!strcmp(opt, "--marker"))
            marker = val;
        else if (!strcmp(opt, "--trigger-path"))
            trigger_path = val;
        else if (!strcmp(opt, "--window"))
            window = atoi(val);
        else if (!strcmp(opt, "--timeout"))
            timeout_s = atoi(val);
        else if (!strcmp(opt, "--gap"))
            gap_s = atof(val);
        else if (!strcmp(opt, "--dump"))
            dump_path = val;
        else if (!strcmp(opt, "--item") && n_items < MAX_ITEMS)
            items[n_items++] = atol(val);
        else
            usage();
    }
    if (port <= 0 || n_streams <= 0 || window <= 0 || !*marker)
        usage();
    raise_nofile();
    marker_len = strlen(marker);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "sse_client: --host must be an IPv4 address\n");
        return 2;
    }
    if (dump_path && !(dump = fopen(dump_path, "wb")))
        die(dump_path);
    conns = calloc(n_streams, sizeof *conns);
    for (int i = 0; i < n_streams; i++)
        conns[i].carry = malloc(marker_len);
    ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");

    int64_t t_connect = now_ns();
    int failed = connect_all();
    printf("ready connected=%d failed=%d connect_ms=%.1f\n", alive(),
           failed, (now_ns() - t_connect) / 1e6);
    fflush(stdout);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    watch(0, EPOLLIN, STDIN_TAG);
    pump(-1, 1);  /* until the harness says go (or closes stdin) */
    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);

    if (n_items == 0) {  /* watch mode: the dump was the point */
        printf("done alive=%d seen=%d\n", alive(), conns[0].seen);
        return 0;
    }
    double cpu0 = cpu_ms();
    int64_t *all = malloc(sizeof(int64_t) * n_streams * n_items);
    int n_all = 0;
    for (int r = 0; r < n_items; r++) {
        pump(gap_s, 0);
        run_round(r, items[r], all, &n_all);
    }
    print_stats("all", all, n_all, n_streams * n_items);
    printf("cpu_rounds_ms=%.1f alive=%d\n", cpu_ms() - cpu0, alive());
    fflush(stdout);
    return 0;
}
