/*
 * connload: many kept-alive HTTP/1.1 connections through a proxy, on
 * loopback, for bench/manyconns.py.
 *
 *   connload MODE PORTS NCONN NSRC [RATE SECONDS]
 *
 * Opens NCONN connections to 127.0.0.1:PORTS (a comma list, used in turn),
 * each bound to one of NSRC source addresses 127.0.0.2, 127.0.0.3, ...
 * (so that no (source, destination) pair runs out of ephemeral ports),
 * at most 256 connects in flight.  The server behind the proxy is nginx
 * answering "hello\n" to every GET.  Then:
 *
 *   idle  prints "connected", waits for a line on stdin, sends one request
 *         on every connection and reads its reply, prints "exchanged",
 *         waits for a line on stdin, and exits;
 *   rr    sends one request on every connection (warm-up, not timed),
 *         prints "timing", then for SECONDS sends RATE requests a second in total, spread over
 *         1 ms ticks and over the connections in turn (a connection whose
 *         last request is unanswered is skipped and counted), and prints
 *         one JSON line: the latency percentiles of the replies (send to
 *         last byte), how many of the 100 ms windows of the run hold a
 *         reply slower than the p99 (few: the slow replies come in
 *         bursts, a stall; most: they are spread), and its own CPU time, so that the caller can tell
 *         whether the generator itself was the bottleneck (its CPU time
 *         while sending at RATE, not the connects and warm-up).
 *
 * One thread, epoll, non-blocking sockets; loopback only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

struct conn {
    int fd;
    int busy;
    uint64_t sent;
    char tail[6];
};

static struct conn *conns;
static int nconn, epfd;
static uint64_t *lat;
static uint32_t *latAt;  /* the 100 ms window (from the start) each reply came in */
static size_t nlat, caplat;
static long errors, skipped;

static uint64_t now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void sendRequest(struct conn *c, int timed)
{
    if (send(c->fd, REQUEST, sizeof(REQUEST) - 1, MSG_NOSIGNAL) != (ssize_t)sizeof(REQUEST) - 1) {
        errors++;
        return;
    }
    c->busy = 1 + timed;
    c->sent = now();
}

/* Read what is there; returns 1 when the reply ends ("hello\n"). */
static int readReply(struct conn *c)
{
    char buf[4096];
    int done = 0;
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            if (n >= 6) {
                memcpy(c->tail, buf + n - 6, 6);
            } else {
                memmove(c->tail, c->tail + n, 6 - n);
                memcpy(c->tail + 6 - n, buf, n);
            }
            done = memcmp(c->tail, "hello\n", 6) == 0;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            errors++;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            c->busy = 0;
            return 0;
        }
        return done;
    }
}

/* Poll the connections until none is busy or the deadline passes. */
static void drain(uint64_t deadline)
{
    struct epoll_event ev[512];
    for (;;) {
        int busy = 0;
        for (int i = 0; i < nconn; i++)
            busy += conns[i].fd >= 0 && conns[i].busy;
        if (!busy || now() > deadline)
            return;
        int n = epoll_wait(epfd, ev, 512, 10);
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u32 >= (uint32_t)nconn)
                continue;
            struct conn *c = &conns[ev[i].data.u32];
            if (c->fd >= 0 && readReply(c))
                c->busy = 0;
        }
    }
}

static void exchangeAll(void)
{
    for (int i = 0; i < nconn; i++)
        if (conns[i].fd >= 0)
            sendRequest(&conns[i], 0);
    drain(now() + 60000000000ull);
}

static void connectAll(const int *ports, int nports, int nsrc)
{
    struct epoll_event ev[512];
    int next = 0, pending = 0, done = 0;
    uint64_t deadline = now() + 120000000000ull;
    while (done < nconn && now() < deadline) {
        while (next < nconn && pending < 256) {
            struct conn *c = &conns[next];
            struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
            int one = 1;
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (c->fd < 0)
                die("socket");
            setsockopt(c->fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(next % nsrc));
            if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0)
                die("bind");
            dst.sin_addr.s_addr = htonl(0x7f000001u);
            dst.sin_port = htons(ports[next % nports]);
            if (connect(c->fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS)
                die("connect");
            struct epoll_event e = {.events = EPOLLOUT, .data.u32 = next};
            epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &e);
            next++;
            pending++;
        }
        int n = epoll_wait(epfd, ev, 512, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[ev[i].data.u32];
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                fprintf(stderr, "connect %u: %s\n", ev[i].data.u32, strerror(err));
                exit(1);
            }
            struct epoll_event e = {.events = EPOLLIN, .data.u32 = ev[i].data.u32};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
            pending--;
            done++;
        }
    }
    if (done < nconn) {
        fprintf(stderr, "only %d of %d connections in 120 s\n", done, nconn);
        exit(1);
    }
}

static void waitLine(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        exit(0);
}

static void runRate(double rate, double seconds)
{
    struct epoll_event ev[512];
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {{0, 1000000}, {0, 1000000}};
    timerfd_settime(tfd, 0, &its, NULL);
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &e);
    caplat = (size_t)(rate * seconds * 1.1) + 1024;
    lat = malloc(caplat * sizeof *lat);
    latAt = malloc(caplat * sizeof *latAt);
    struct rusage ru0, ru;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t start = now(), end = start + (uint64_t)(seconds * 1e9);
    double owed = 0;
    int rr = 0;
    long sent = 0;
    while (now() < end) {
        int n = epoll_wait(epfd, ev, 512, 5);
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u32 == UINT32_MAX) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) != sizeof ticks)
                    continue;
                /* what the elapsed time owes, less what was sent */
                owed = rate * (now() - start) / 1e9 - sent;
                while (owed >= 1) {
                    struct conn *c = &conns[rr];
                    rr = (rr + 1) % nconn;
                    owed--;
                    sent++;
                    if (c->fd < 0 || c->busy) {
                        skipped++;
                        continue;
                    }
                    sendRequest(c, 1);
                }
                continue;
            }
            struct conn *c = &conns[ev[i].data.u32];
            if (c->fd < 0)
                continue;
            int timed = c->busy == 2;
            uint64_t sentAt = c->sent;
            if (readReply(c)) {
                if (timed && nlat < caplat) {
                    uint64_t t = now();
                    latAt[nlat] = (uint32_t)((t - start) / 100000000u);
                    lat[nlat++] = t - sentAt;
                }
                c->busy = 0;
            }
        }
    }
    double elapsed = (now() - start) / 1e9;
    epoll_ctl(epfd, EPOLL_CTL_DEL, tfd, NULL);
    close(tfd);
    drain(now() + 2000000000ull);
    getrusage(RUSAGE_SELF, &ru);
    /* Whether the slow replies come in bursts: the 100 ms windows that
     * hold a reply slower than the p99, of all the windows. */
    uint64_t *sorted = malloc((nlat + 1) * sizeof *sorted);
    memcpy(sorted, lat, nlat * sizeof *lat);
    qsort(sorted, nlat, sizeof *sorted, cmp);
    uint64_t p99 = nlat ? sorted[(size_t)((nlat - 1) * 0.99)] : 0;
    size_t windows = (size_t)(seconds * 10) + 30;
    char *slow = calloc(windows, 1);
    size_t slowWindows = 0;
    for (size_t i = 0; i < nlat; i++)
        if (lat[i] > p99 && latAt[i] < windows && !slow[latAt[i]]) {
            slow[latAt[i]] = 1;
            slowWindows++;
        }
    memcpy(lat, sorted, nlat * sizeof *lat);
    free(sorted);
    free(slow);
#define PCT(p) (nlat ? lat[(size_t)((nlat - 1) * (p))] / 1e3 : -1.0)
    printf("{\"connections\": %d, \"replies\": %zu, \"seconds\": %.2f, \"rate\": %.1f, "
           "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
           "\"skipped_busy\": %ld, \"errors\": %ld, \"generator_cpu_s\": %.3f, "
           "\"slow_windows\": %zu, \"windows\": %zu}\n",
           nconn, nlat, elapsed, nlat / elapsed, PCT(0.5), PCT(0.9), PCT(0.99), PCT(0.999), PCT(1.0),
           skipped, errors,
           (ru.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
               ((ru.ru_utime.tv_usec - ru0.ru_utime.tv_usec) + (ru.ru_stime.tv_usec - ru0.ru_stime.tv_usec)) / 1e6,
           slowWindows, (size_t)(elapsed * 10 + 0.5));
}

int main(int argc, char **argv)
{
    if (argc < 5 || (strcmp(argv[1], "rr") == 0 && argc < 7)) {
        fprintf(stderr, "usage: connload idle|rr PORTS NCONN NSRC [RATE SECONDS]\n");
        return 2;
    }
    int ports[64], nports = 0;
    for (char *p = strtok(argv[2], ","); p && nports < 64; p = strtok(NULL, ","))
        ports[nports++] = atoi(p);
    nconn = atoi(argv[3]);
    int nsrc = atoi(argv[4]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconn + 16 > rl.rlim_cur) {
        fprintf(stderr, "RLIMIT_NOFILE %lu is too low for %d connections\n", (unsigned long)rl.rlim_cur, nconn);
        return 1;
    }
    conns = calloc(nconn, sizeof *conns);
    epfd = epoll_create1(0);
    if (epfd < 0)
        die("epoll_create1");
    setvbuf(stdout, NULL, _IOLBF, 0);
    connectAll(ports, nports, nsrc);
    if (strcmp(argv[1], "idle") == 0) {
        printf("connected\n");
        waitLine();
        exchangeAll();
        printf("exchanged %ld\n", errors);
        waitLine();
        return 0;
    }
    exchangeAll();
    printf("timing\n");
    runRate(atof(argv[5]), atof(argv[6]));
    return 0;
}
