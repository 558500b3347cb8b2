/*
 * drop_client: a whole drop from the outside, for bench/run.py drop.
 *
 * Watchers: opens N SSE streams to HOST:PORT PATH (at most --window
 * waiting for their headers at a time), says
 *
 *     ready connected=N failed=F connect_ms=T
 *
 * and waits for a line on stdin. From then on it parses every event of
 * every stream (its `id:` and `event:` lines) and records, for each event
 * a stream completes, (stream, event kind, seq from the id, the
 * CLOCK_MONOTONIC ns of the read that completed it).
 *
 * Buyers: --buyers B keep-alive connections, each a new shopper on every
 * request (no cookie is ever sent), POST /api/purchase for a random item
 * of --items that is not known to be sold out, one request in flight per
 * connection, until every item answered 409 sold_out. They start at the
 * first `released` event any stream sees (--buy-start released: shoppers
 * click when the sizes appear) or at once (--buy-start go). Each answer is
 * recorded: (item, status, sent ns, answered ns, order id or 0).
 *
 * It ends when the buyers are done and no stream read anything for
 * --linger seconds, or --timeout seconds after the go; then it writes the
 * records (--events FILE, --purchases FILE; little-endian, see run.py)
 * and prints
 *
 * --first FILE writes stream 0's events as text lines (seq, kind, data,
 * the data cut at 500 bytes), which tells what each seq was.
 *
 *     done deliveries=D purchases=P s201=.. s409=.. other=.. alive=A
 *          buy_start_ns=.. buy_end_ns=.. cpu_ms=..
 *
 * Build: gcc -O2 -o drop_client drop_client.c
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
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 256
#define STDIN_TAG UINT32_MAX
#define BUYER_BIT 0x80000000u

enum { CONNECTING, HEADERS, STREAMING, DEAD };
enum { EV_OTHER, EV_RELEASED, EV_STOCK, EV_SNAPSHOT };

struct stream {
    int fd, state;
    char head[1024];
    size_t head_len;
    char line[256];
    size_t line_len;
    int64_t seq;
    int kind;
};

struct buyer {
    int fd, state;         /* CONNECTING, HEADERS (waiting), DEAD */
    long item;
    int64_t sent;
    char buf[4096];
    size_t len;
};

struct delivery { uint32_t stream; uint8_t kind; int64_t seq, t; };
struct purchase { int64_t item; int32_t status; int64_t sent, answered, order; };

static const char *host = "127.0.0.1", *path = "/events";
static const char *events_path, *purchases_path, *buy_start = "released";
static const char *first_path;     /* stream 0's events, with their data */
static FILE *first;
static char first_data[512];
static int port, n_streams, window = 500, n_buyers, timeout_s = 60;
static double linger_s = 2.0;
static long items[MAX_ITEMS];
static int n_items, out[MAX_ITEMS], n_out;
static struct stream *streams;
static struct buyer *buyers;
static struct delivery *deliveries;
static size_t n_deliveries, cap_deliveries;
static struct purchase *purchases;
static size_t n_purchases, cap_purchases;
static int ep, buyers_started, buyers_left;
static int64_t buy_start_ns, buy_end_ns, last_read_ns;
static struct sockaddr_in addr;
static long s201, s409, s_other;

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

static void *grow(void *p, size_t *cap, size_t size)
{
    *cap = *cap ? *cap * 2 : 65536;
    p = realloc(p, *cap * size);
    if (!p)
        die("realloc");
    return p;
}

static int open_socket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 &&
        errno != EINPROGRESS)
        die("connect");
    return fd;
}

static void watch(int fd, uint32_t events, uint32_t tag, int op)
{
    struct epoll_event ev = {.events = events, .data.u32 = tag};
    if (epoll_ctl(ep, op, fd, &ev) < 0)
        die("epoll_ctl");
}

static void close_fd(int *fd, int *state)
{
    if (*state != DEAD) {
        epoll_ctl(ep, EPOLL_CTL_DEL, *fd, NULL);
        close(*fd);
        *state = DEAD;
    }
}

/* -- watchers ------------------------------------------------------------ */

static void stream_request(uint32_t i)
{
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Accept: text/event-stream\r\n\r\n", path, host, port);
    struct stream *s = &streams[i];
    if (write(s->fd, req, n) != n) {
        close_fd(&s->fd, &s->state);
        return;
    }
    s->state = HEADERS;
    watch(s->fd, EPOLLIN, i, EPOLL_CTL_MOD);
}

static void start_buyers(int64_t t);

static void event_done(uint32_t i, int64_t t)
{
    struct stream *s = &streams[i];
    if (n_deliveries == cap_deliveries)
        deliveries = grow(deliveries, &cap_deliveries, sizeof *deliveries);
    deliveries[n_deliveries++] = (struct delivery){i, (uint8_t)s->kind,
                                                   s->seq, t};
    if (i == 0 && first)
        fprintf(first, "%lld\t%d\t%s\n", (long long)s->seq, s->kind,
                first_data);
    if (s->kind == EV_RELEASED && !buyers_started &&
        !strcmp(buy_start, "released"))
        start_buyers(t);
    s->kind = EV_OTHER;
    s->seq = -1;
}

static void stream_line(uint32_t i, int64_t t)
{
    struct stream *s = &streams[i];
    char *line = s->line;
    line[s->line_len] = 0;
    if (s->line_len == 0) {
        if (s->seq >= 0)
            event_done(i, t);
    } else if (!strncmp(line, "id: ", 4)) {
        char *dash = strrchr(line, '-');
        s->seq = dash ? atoll(dash + 1) : -1;
    } else if (i == 0 && !strncmp(line, "data: ", 6)) {
        snprintf(first_data, sizeof first_data, "%s", line + 6);
    } else if (!strncmp(line, "event: ", 7)) {
        const char *name = line + 7;
        s->kind = !strcmp(name, "released") ? EV_RELEASED
                  : !strcmp(name, "stock_change") ? EV_STOCK
                  : !strcmp(name, "snapshot") ? EV_SNAPSHOT : EV_OTHER;
    }
    s->line_len = 0;
}

static void stream_bytes(uint32_t i, const char *data, size_t len,
                         int64_t t)
{
    struct stream *s = &streams[i];
    for (size_t k = 0; k < len; k++) {
        if (data[k] == '\n')
            stream_line(i, t);
        else if (s->line_len < sizeof s->line - 1)
            s->line[s->line_len++] = data[k];
    }
}

static void stream_read(uint32_t i)
{
    static char buf[65536];
    struct stream *s = &streams[i];
    for (;;) {
        ssize_t n = read(s->fd, buf, sizeof buf);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close_fd(&s->fd, &s->state);
            return;
        }
        if (n < 0)
            return;
        int64_t t = now_ns();
        last_read_ns = t;
        const char *data = buf;
        size_t len = n;
        if (s->state == HEADERS) {
            size_t room = sizeof s->head - 1 - s->head_len;
            size_t take = len < room ? len : room;
            memcpy(s->head + s->head_len, data, take);
            s->head_len += take;
            s->head[s->head_len] = 0;
            char *eoh = strstr(s->head, "\r\n\r\n");
            if (!eoh && s->head_len < sizeof s->head - 1)
                return;
            if (strncmp(s->head, "HTTP/1.1 200", 12) != 0 || !eoh) {
                close_fd(&s->fd, &s->state);
                return;
            }
            s->state = STREAMING;
            s->seq = -1;
            size_t used = (eoh + 4 - s->head) - (s->head_len - take);
            data += used;
            len -= used;
        }
        stream_bytes(i, data, len, t);
    }
}

static int streams_alive(void)
{
    int n = 0;
    for (int i = 0; i < n_streams; i++)
        n += streams[i].state == STREAMING;
    return n;
}

static int connect_streams(void)
{
    int next = 0, pending = 0, done = 0, failed = 0;
    struct epoll_event evs[1024];
    int64_t deadline = now_ns() + (int64_t)120 * 1000000000;
    while (done < n_streams && now_ns() < deadline) {
        while (pending < window && next < n_streams) {
            streams[next].fd = open_socket();
            streams[next].state = CONNECTING;
            watch(streams[next].fd, EPOLLOUT | EPOLLIN, next,
                  EPOLL_CTL_ADD);
            next++;
            pending++;
        }
        int n = epoll_wait(ep, evs, 1024, 1000);
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            struct stream *s = &streams[i];
            int before = s->state;
            if (before == CONNECTING) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || evs[k].events & (EPOLLERR | EPOLLHUP))
                    close_fd(&s->fd, &s->state);
                else
                    stream_request(i);
            } else if (before != DEAD) {
                stream_read(i);
            }
            if ((before == CONNECTING || before == HEADERS) &&
                (s->state == STREAMING || s->state == DEAD)) {
                pending--;
                done++;
                failed += s->state == DEAD;
            }
        }
    }
    return failed + (n_streams - done);
}

/* -- buyers -------------------------------------------------------------- */

static long pick_item(void)
{
    if (n_out >= n_items)
        return -1;
    for (;;) {
        int k = rand() % n_items;
        if (!out[k])
            return items[k];
    }
}

static void buyer_done(struct buyer *b)
{
    close_fd(&b->fd, &b->state);
    if (--buyers_left == 0)
        buy_end_ns = now_ns();
}

static void buyer_send(uint32_t j)
{
    struct buyer *b = &buyers[j];
    b->item = pick_item();
    if (b->item < 0)
        return buyer_done(b);
    char body[64], req[512];
    int blen = snprintf(body, sizeof body, "{\"item_id\": %ld}", b->item);
    int rlen = snprintf(req, sizeof req,
                        "POST /api/purchase HTTP/1.1\r\nHost: %s:%d\r\n"
                        "Content-Type: application/json\r\n"
                        "Content-Length: %d\r\n\r\n%s",
                        host, port, blen, body);
    b->sent = now_ns();
    b->len = 0;
    if (write(b->fd, req, rlen) != rlen)
        return buyer_done(b);
    b->state = HEADERS;
    watch(b->fd, EPOLLIN, j | BUYER_BIT, EPOLL_CTL_MOD);
}

static void buyer_connect(uint32_t j)
{
    struct buyer *b = &buyers[j];
    b->fd = open_socket();
    b->state = CONNECTING;
    watch(b->fd, EPOLLOUT, j | BUYER_BIT, EPOLL_CTL_ADD);
}

static void start_buyers(int64_t t)
{
    buyers_started = 1;
    buy_start_ns = t;
    buyers_left = n_buyers;
    for (int j = 0; j < n_buyers; j++)
        buyer_connect(j);
}

static void mark_out(long item)
{
    for (int k = 0; k < n_items; k++)
        if (items[k] == item && !out[k]) {
            out[k] = 1;
            n_out++;
        }
}

/* A whole answer in b->buf: its length, or 0 while incomplete. */
static size_t answer_length(struct buyer *b, int *status, char **body)
{
    b->buf[b->len < sizeof b->buf ? b->len : sizeof b->buf - 1] = 0;
    char *eoh = strstr(b->buf, "\r\n\r\n");
    if (!eoh)
        return 0;
    long length = 0;
    char *field = strcasestr(b->buf, "\r\nContent-Length:");
    if (field && field < eoh)
        length = atol(field + 17);
    size_t total = (eoh + 4 - b->buf) + length;
    if (b->len < total)
        return 0;
    *status = atoi(b->buf + 9);
    *body = eoh + 4;
    return total;
}

static void buyer_read(uint32_t j)
{
    struct buyer *b = &buyers[j];
    ssize_t n = read(b->fd, b->buf + b->len, sizeof b->buf - 1 - b->len);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
        return buyer_done(b);
    if (n < 0)
        return;
    b->len += n;
    int status;
    char *body;
    size_t total = answer_length(b, &status, &body);
    if (!total)
        return;
    int64_t t = now_ns();
    char saved = b->buf[total];
    b->buf[total] = 0;
    int64_t order = 0;
    char *o = strstr(body, "\"order_id\": ");
    if (status == 201 && o)
        order = atoll(o + 12);
    if (status == 201)
        s201++;
    else if (status == 409)
        s409++;
    else
        s_other++;
    if (status == 409 && strstr(body, "sold_out"))
        mark_out(b->item);
    b->buf[total] = saved;
    if (n_purchases == cap_purchases)
        purchases = grow(purchases, &cap_purchases, sizeof *purchases);
    purchases[n_purchases++] = (struct purchase){b->item, status, b->sent,
                                                 t, order};
    if (b->len > total)   /* nothing is pipelined: a stray byte is a bug */
        return buyer_done(b);
    if (strcasestr(b->buf, "\r\nConnection: close")) {
        close_fd(&b->fd, &b->state);
        buyer_connect(j);
        return;
    }
    buyer_send(j);
}

/* -- the drop ------------------------------------------------------------ */

static void run(void)
{
    struct epoll_event evs[1024];
    int64_t deadline = now_ns() + (int64_t)timeout_s * 1000000000;
    if (!strcmp(buy_start, "go"))
        start_buyers(now_ns());
    last_read_ns = now_ns();
    for (;;) {
        int64_t t = now_ns();
        if (t > deadline)
            break;
        int buying = n_buyers && (!buyers_started || buyers_left > 0);
        if (!buying && t - last_read_ns > (int64_t)(linger_s * 1e9))
            break;
        int n = epoll_wait(ep, evs, 1024, 50);
        for (int k = 0; k < n; k++) {
            uint32_t tag = evs[k].data.u32;
            if (tag == STDIN_TAG)
                continue;
            if (tag & BUYER_BIT) {
                uint32_t j = tag & ~BUYER_BIT;
                struct buyer *b = &buyers[j];
                if (b->state == CONNECTING) {
                    int err = 0;
                    socklen_t l = sizeof err;
                    getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                    if (err)
                        buyer_done(b);
                    else
                        buyer_send(j);
                } else if (b->state == HEADERS) {
                    buyer_read(j);
                }
            } else if (streams[tag].state != DEAD) {
                stream_read(tag);
            }
        }
    }
}

static void write_records(void)
{
    if (events_path) {
        FILE *f = fopen(events_path, "wb");
        if (!f)
            die(events_path);
        for (size_t k = 0; k < n_deliveries; k++) {
            struct delivery *d = &deliveries[k];
            fwrite(&d->stream, 4, 1, f);
            fwrite(&d->kind, 1, 1, f);
            fwrite(&d->seq, 8, 1, f);
            fwrite(&d->t, 8, 1, f);
        }
        fclose(f);
    }
    if (purchases_path) {
        FILE *f = fopen(purchases_path, "wb");
        if (!f)
            die(purchases_path);
        for (size_t k = 0; k < n_purchases; k++) {
            struct purchase *p = &purchases[k];
            fwrite(&p->item, 8, 1, f);
            fwrite(&p->status, 4, 1, f);
            fwrite(&p->sent, 8, 1, f);
            fwrite(&p->answered, 8, 1, f);
            fwrite(&p->order, 8, 1, f);
        }
        fclose(f);
    }
}

static double cpu_ms(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

static void parse_items(const char *text)
{
    char *copy = strdup(text), *save = NULL;
    for (char *p = strtok_r(copy, ",", &save); p && n_items < MAX_ITEMS;
         p = strtok_r(NULL, ",", &save))
        items[n_items++] = atol(p);
    free(copy);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: drop_client --port P [--host H] [--streams N] "
            "[--path P] [--window W]\n"
            "       [--buyers B --items I,J,.. --buy-start released|go] "
            "[--timeout S] [--linger S]\n"
            "       [--events FILE] [--purchases FILE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int a = 1; a < argc; a++) {
        const char *opt = argv[a];
        if (a + 1 >= argc)
            usage();
        const char *val = argv[++a];
        if (!strcmp(opt, "--host")) host = val;
        else if (!strcmp(opt, "--port")) port = atoi(val);
        else if (!strcmp(opt, "--streams")) n_streams = atoi(val);
        else if (!strcmp(opt, "--path")) path = val;
        else if (!strcmp(opt, "--window")) window = atoi(val);
        else if (!strcmp(opt, "--buyers")) n_buyers = atoi(val);
        else if (!strcmp(opt, "--items")) parse_items(val);
        else if (!strcmp(opt, "--buy-start")) buy_start = val;
        else if (!strcmp(opt, "--timeout")) timeout_s = atoi(val);
        else if (!strcmp(opt, "--linger")) linger_s = atof(val);
        else if (!strcmp(opt, "--events")) events_path = val;
        else if (!strcmp(opt, "--purchases")) purchases_path = val;
        else if (!strcmp(opt, "--first")) first_path = val;
        else usage();
    }
    if (port <= 0 || n_streams < 0 || (n_buyers && !n_items))
        usage();
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    srand(23);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "drop_client: --host must be an IPv4 address\n");
        return 2;
    }
    if (first_path && !(first = fopen(first_path, "w")))
        die(first_path);
    streams = calloc(n_streams ? n_streams : 1, sizeof *streams);
    buyers = calloc(n_buyers ? n_buyers : 1, sizeof *buyers);
    ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");
    int64_t t0 = now_ns();
    int failed = connect_streams();
    printf("ready connected=%d failed=%d connect_ms=%.1f\n",
           streams_alive(), failed, (now_ns() - t0) / 1e6);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 0;
    double cpu0 = cpu_ms();
    run();
    write_records();
    if (first)
        fclose(first);
    printf("done deliveries=%zu purchases=%zu s201=%ld s409=%ld other=%ld "
           "alive=%d buy_start_ns=%lld buy_end_ns=%lld cpu_ms=%.1f\n",
           n_deliveries, n_purchases, s201, s409, s_other, streams_alive(),
           (long long)buy_start_ns, (long long)buy_end_ns, cpu_ms() - cpu0);
    fflush(stdout);
    return 0;
}
