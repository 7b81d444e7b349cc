/*
 * An experiment, not part of portproxy: a TCP relay whose bytes never
 * reach user space.  The kernel's socket redirection (an eBPF SOCKHASH
 * with an SK_SKB stream verdict program calling bpf_sk_redirect_hash)
 * moves every skb that arrives on one socket of a pair to the egress of
 * the other; this program only accepts, dials, inserts both sockets in the
 * map, and forwards the end of each direction (EOF on one side ->
 * shutdown(SHUT_WR) on the other; both ends closed when both directions
 * ended).  See docs/PERFORMANCE.md, "The kernel's socket redirection
 * (eBPF sockmap), tried", and bench/sockmap.py, which drives it.
 *
 *     gcc -O2 -Wall -Wextra -o sockmap bench/sockmap.c
 *     ./sockmap LISTEN_PORT TARGET_PORT [count] [drain] [verdict] [stats]
 *
 * Both ports on 127.0.0.1.  Options:
 *   count    the verdict program also adds each skb's length to a per-flow
 *            counter (a BPF hash map, atomic add); at close the relay reads
 *            both counters and writes an access line to stdout.
 *   drain    on EOF from one side, wait until the other side's socket has
 *            been given every byte this side received (TCP_INFO:
 *            tcpi_bytes_received of this side against bytes_sent -
 *            bytes_retrans + notsent_bytes of the other) before shutting
 *            it down; without it the shutdown follows the EOF at once.
 *   verdict  attach as BPF_SK_SKB_VERDICT instead of
 *            BPF_SK_SKB_STREAM_VERDICT.
 *   stats    have the kernel time the verdict program (BPF_ENABLE_STATS,
 *            on while this process runs) and print its runs and average
 *            run time on SIGTERM.
 *
 * SOCKMAP_DEBUG in the environment: a line on stderr for each event and
 * each shutdown.
 *
 * No libbpf and no clang: the program is a dozen raw BPF instructions
 * loaded with the bpf() system call.  Needs root (CAP_BPF, CAP_NET_ADMIN).
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <linux/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The instruction macros of the kernel's samples/bpf and
 * tools/include/linux/filter.h, the few this program needs. */
#define INSN(CODE, DST, SRC, OFF, IMM) \
    ((struct bpf_insn){.code = (CODE), .dst_reg = (DST), .src_reg = (SRC), .off = (OFF), .imm = (IMM)})
#define MOV64_REG(DST, SRC) INSN(BPF_ALU64 | BPF_MOV | BPF_X, DST, SRC, 0, 0)
#define MOV64_IMM(DST, IMM) INSN(BPF_ALU64 | BPF_MOV | BPF_K, DST, 0, 0, IMM)
#define ADD64_IMM(DST, IMM) INSN(BPF_ALU64 | BPF_ADD | BPF_K, DST, 0, 0, IMM)
#define LDX_W(DST, SRC, OFF) INSN(BPF_LDX | BPF_W | BPF_MEM, DST, SRC, OFF, 0)
#define STX_W(DST, SRC, OFF) INSN(BPF_STX | BPF_W | BPF_MEM, DST, SRC, OFF, 0)
#define ATOMIC_ADD_DW(DST, SRC, OFF) INSN(BPF_STX | BPF_DW | BPF_ATOMIC, DST, SRC, OFF, BPF_ADD)
/* Two instructions: the second carries the upper half of the immediate. */
#define LD_MAP_FD(DST, FD)                                                 \
    prog[n++] = INSN(BPF_LD | BPF_DW | BPF_IMM, DST, BPF_PSEUDO_MAP_FD, 0, FD); \
    prog[n++] = INSN(0, 0, 0, 0, 0)
#define CALL(FUNC) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, FUNC)
#define JEQ_IMM(DST, IMM, OFF) INSN(BPF_JMP | BPF_JEQ | BPF_K, DST, 0, OFF, IMM)
#define JNE_IMM(DST, IMM, OFF) INSN(BPF_JMP | BPF_JNE | BPF_K, DST, 0, OFF, IMM)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)

#define SK_DROP 0
#define SK_PASS 1

/* A socket as the verdict program sees it in the __sk_buff of an skb that
 * arrived on it; the map holds, under this key, the socket's PEER. */
struct flowKey {
    uint32_t localIP, remoteIP, localPort, remotePort;
};

struct end {
    struct conn *conn;
    int side; /* 0 client, 1 target */
};

struct conn {
    int fd[2];
    struct end ends[2];
    struct flowKey key[2];
    int connected, closed, eof[2], shut[2], pending[2];
    struct conn *nextPending, *nextClosed;
};

static int sockhash, counts = -1, epfd, drainMode, debug, prog;
static unsigned long fallbacks;
static volatile sig_atomic_t stopping;

static void onTerm(int sig)
{
    (void)sig;
    stopping = 1;
}
/* Connections waiting to shut a side down (drain), and those closed in
 * this batch of events, freed after it (a later event of the batch may
 * name them). */
static struct conn *pendingList, *closedList;
static struct sockaddr_in targetAddr;

static long sysBPF(int cmd, union bpf_attr *attr)
{
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int mapCreate(uint32_t type, uint32_t keySize, uint32_t valueSize, uint32_t entries)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_type = type;
    attr.key_size = keySize;
    attr.value_size = valueSize;
    attr.max_entries = entries;
    int fd = (int)sysBPF(BPF_MAP_CREATE, &attr);
    if (fd < 0) {
        fprintf(stderr, "sockmap: BPF_MAP_CREATE type %u: %s\n", type, strerror(errno));
        exit(1);
    }
    return fd;
}

static int mapUpdate(int map, const void *key, const void *value)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = map;
    attr.key = (uint64_t)(uintptr_t)key;
    attr.value = (uint64_t)(uintptr_t)value;
    attr.flags = BPF_ANY;
    return (int)sysBPF(BPF_MAP_UPDATE_ELEM, &attr);
}

static int mapLookup(int map, const void *key, void *value)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = map;
    attr.key = (uint64_t)(uintptr_t)key;
    attr.value = (uint64_t)(uintptr_t)value;
    return (int)sysBPF(BPF_MAP_LOOKUP_ELEM, &attr);
}

static void mapDelete(int map, const void *key)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = map;
    attr.key = (uint64_t)(uintptr_t)key;
    sysBPF(BPF_MAP_DELETE_ELEM, &attr);
}

/* The verdict: build the key from the skb's own socket, count its bytes
 * (with the count option), redirect it to the egress of the socket stored
 * under that key; when there is none yet (the pair is being inserted),
 * pass it to this socket's own queue, which the relay reads once. */
static int loadVerdict(void)
{
    struct bpf_insn prog[40];
    int n = 0;
    prog[n++] = MOV64_REG(BPF_REG_6, BPF_REG_1);
    /* An skb without data (a bare FIN): dropped, not redirected; the
     * relay forwards the end itself (redirected, it reaches the peer's
     * egress after the relay's shutdown, and sending it fails: EPIPE). */
    prog[n++] = LDX_W(BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len));
    prog[n++] = JNE_IMM(BPF_REG_7, 0, 2);
    prog[n++] = MOV64_IMM(BPF_REG_0, SK_DROP);
    prog[n++] = EXIT();
    prog[n++] = LDX_W(BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, local_ip4));
    prog[n++] = STX_W(BPF_REG_10, BPF_REG_2, -16);
    prog[n++] = LDX_W(BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, remote_ip4));
    prog[n++] = STX_W(BPF_REG_10, BPF_REG_2, -12);
    prog[n++] = LDX_W(BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, local_port));
    prog[n++] = STX_W(BPF_REG_10, BPF_REG_2, -8);
    prog[n++] = LDX_W(BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, remote_port));
    prog[n++] = STX_W(BPF_REG_10, BPF_REG_2, -4);
    if (counts >= 0) {
        LD_MAP_FD(BPF_REG_1, counts);
        prog[n++] = MOV64_REG(BPF_REG_2, BPF_REG_10);
        prog[n++] = ADD64_IMM(BPF_REG_2, -16);
        prog[n++] = CALL(BPF_FUNC_map_lookup_elem);
        prog[n++] = JEQ_IMM(BPF_REG_0, 0, 1);
        prog[n++] = ATOMIC_ADD_DW(BPF_REG_0, BPF_REG_7, 0);
    }
    prog[n++] = MOV64_REG(BPF_REG_1, BPF_REG_6);
    LD_MAP_FD(BPF_REG_2, sockhash);
    prog[n++] = MOV64_REG(BPF_REG_3, BPF_REG_10);
    prog[n++] = ADD64_IMM(BPF_REG_3, -16);
    prog[n++] = MOV64_IMM(BPF_REG_4, 0); /* egress of the peer */
    prog[n++] = CALL(BPF_FUNC_sk_redirect_hash);
    prog[n++] = JNE_IMM(BPF_REG_0, SK_DROP, 1);
    prog[n++] = MOV64_IMM(BPF_REG_0, SK_PASS);
    prog[n++] = EXIT();

    static char log[65536];
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SK_SKB;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = (uint32_t)n;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = sizeof(log);
    attr.log_level = 1;
    int fd = (int)sysBPF(BPF_PROG_LOAD, &attr);
    if (fd < 0) {
        fprintf(stderr, "sockmap: BPF_PROG_LOAD: %s\n%s\n", strerror(errno), log);
        exit(1);
    }
    return fd;
}

static int statsFD = -1;

static void enableStats(void)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.enable_stats.type = BPF_STATS_RUN_TIME;
    statsFD = (int)sysBPF(BPF_ENABLE_STATS, &attr);
    if (statsFD < 0)
        fprintf(stderr, "sockmap: BPF_ENABLE_STATS: %s\n", strerror(errno));
}

static void printStats(void)
{
    if (statsFD < 0)
        return;
    struct bpf_prog_info info;
    union bpf_attr attr;
    memset(&info, 0, sizeof(info));
    memset(&attr, 0, sizeof(attr));
    attr.info.bpf_fd = (uint32_t)prog;
    attr.info.info_len = sizeof(info);
    attr.info.info = (uint64_t)(uintptr_t)&info;
    if (sysBPF(BPF_OBJ_GET_INFO_BY_FD, &attr) < 0) {
        fprintf(stderr, "sockmap: BPF_OBJ_GET_INFO_BY_FD: %s\n", strerror(errno));
        return;
    }
    fprintf(stderr, "sockmap: verdict program: %llu runs, %llu ns, %.1f ns a run\n",
            (unsigned long long)info.run_cnt, (unsigned long long)info.run_time_ns,
            info.run_cnt ? (double)info.run_time_ns / (double)info.run_cnt : 0.0);
}

static void keyOf(int fd, struct flowKey *key)
{
    struct sockaddr_in local, remote;
    socklen_t len = sizeof(local);
    getsockname(fd, (struct sockaddr *)&local, &len);
    len = sizeof(remote);
    getpeername(fd, (struct sockaddr *)&remote, &len);
    key->localIP = local.sin_addr.s_addr;
    key->remoteIP = remote.sin_addr.s_addr;
    key->localPort = ntohs(local.sin_port);
    /* __sk_buff.remote_port: the network-order port in the upper half of
     * the word on little-endian machines (the kernel shifts skc_dport). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    key->remotePort = (uint32_t)remote.sin_port << 16;
#else
    key->remotePort = remote.sin_port;
#endif
}

static void watch(int op, int fd, uint32_t events, struct end *end)
{
    struct epoll_event ev = {.events = events, .data.ptr = end};
    epoll_ctl(epfd, op, fd, &ev);
}

static void closeConn(struct conn *c)
{
    if (c->connected && counts >= 0) {
        uint64_t in = 0, out = 0;
        mapLookup(counts, &c->key[0], &in);
        mapLookup(counts, &c->key[1], &out);
        mapDelete(counts, &c->key[0]);
        mapDelete(counts, &c->key[1]);
        printf("flow %u->%u: %llu bytes up, %llu down\n", ntohs((uint16_t)(c->key[0].remotePort >> 16)),
               c->key[0].localPort, (unsigned long long)in, (unsigned long long)out);
    }
    /* Closing a socket takes it out of the sockhash (and the epoll set). */
    close(c->fd[0]);
    close(c->fd[1]);
    c->closed = 1;
    c->nextClosed = closedList;
    closedList = c;
}

static uint64_t bytesIn(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len);
    return info.tcpi_bytes_received;
}

static uint64_t bytesWritten(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len);
    return info.tcpi_bytes_sent - info.tcpi_bytes_retrans + info.tcpi_notsent_bytes;
}

/* Whether everything side C{side} received was handed to the other side's
 * socket (its FIN counts one in tcpi_bytes_received). */
static int drained(struct conn *c, int side)
{
    return bytesWritten(c->fd[!side]) + 1 >= bytesIn(c->fd[side]);
}

static void shutPeer(struct conn *c, int side)
{
    if (debug)
        fprintf(stderr, "%p: side %d ended: in %llu, other side written %llu: shutdown\n", (void *)c, side,
                (unsigned long long)bytesIn(c->fd[side]), (unsigned long long)bytesWritten(c->fd[!side]));
    shutdown(c->fd[!side], SHUT_WR);
    c->shut[!side] = 1;
    if (c->eof[0] && c->eof[1])
        closeConn(c);
}

static void sideEnded(struct conn *c, int side)
{
    if (c->eof[side])
        return;
    c->eof[side] = 1;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd[side], NULL);
    if (drainMode && !drained(c, side)) {
        c->pending[side] = 1;
        if (!c->pending[!side]) {
            c->nextPending = pendingList;
            pendingList = c;
        }
        return;
    }
    shutPeer(c, side);
}

static void checkPending(void)
{
    struct conn **p = &pendingList;
    while (*p) {
        struct conn *c = *p;
        for (int side = 0; side < 2; side++) {
            if (c->pending[side] && !c->closed && drained(c, side)) {
                c->pending[side] = 0;
                shutPeer(c, side);
            }
        }
        if (c->closed || !(c->pending[0] || c->pending[1]))
            *p = c->nextPending;
        else
            p = &c->nextPending;
    }
}

/* What the verdict passed to a socket's own queue before its peer was in
 * the map (and data queued before the socket was: a recv makes the kernel
 * run the verdict on it), forwarded by hand once. */
static int flushPassed(struct conn *c, int side)
{
    char buf[65536];
    for (;;) {
        ssize_t got = recv(c->fd[side], buf, sizeof(buf), MSG_DONTWAIT);
        if (got <= 0)
            return got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK) ? -1 : 0;
        for (ssize_t off = 0; off < got;) {
            ssize_t sent = send(c->fd[!side], buf + off, (size_t)(got - off), MSG_NOSIGNAL);
            if (sent < 0)
                return -1;
            off += sent;
        }
    }
}

static int established(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len);
    return info.tcpi_state == BPF_TCP_ESTABLISHED;
}

struct copy {
    struct conn *conn;
    int side;
    uint64_t bytes;
};

static pthread_mutex_t fallbackLock = PTHREAD_MUTEX_INITIALIZER;

/* One direction of a connection relayed in user space: blocking reads and
 * writes until EOF, then the shutdown; the second direction to end closes
 * the pair. */
static void *copyThread(void *arg)
{
    struct copy *copy = arg;
    struct conn *c = copy->conn;
    char buf[65536];
    ssize_t got;
    while ((got = recv(c->fd[copy->side], buf, sizeof(buf), 0)) > 0) {
        for (ssize_t off = 0; off < got;) {
            ssize_t sent = send(c->fd[!copy->side], buf + off, (size_t)(got - off), MSG_NOSIGNAL);
            if (sent < 0)
                goto out;
            off += sent;
        }
        copy->bytes += (uint64_t)got;
    }
out:
    shutdown(c->fd[!copy->side], SHUT_WR);
    pthread_mutex_lock(&fallbackLock);
    int last = ++c->shut[0] == 2;
    pthread_mutex_unlock(&fallbackLock);
    if (last) {
        struct copy *copies = copy - copy->side;
        if (counts >= 0)
            printf("flow %u->%u: %llu bytes up, %llu down (user space)\n",
                   ntohs((uint16_t)(c->key[0].remotePort >> 16)), c->key[0].localPort,
                   (unsigned long long)copies[0].bytes, (unsigned long long)copies[1].bytes);
        close(c->fd[0]);
        close(c->fd[1]);
        free(copies);
        free(c);
    }
    return NULL;
}

/* A connection that cannot be redirected in the kernel: relayed by two
 * threads, as a user-space relay does; the epoll loop forgets it. */
static void fallBack(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd[1], NULL);
    int flags = 0;
    ioctl(c->fd[0], FIONBIO, &flags);
    ioctl(c->fd[1], FIONBIO, &flags);
    fallbacks++;
    if (debug)
        fprintf(stderr, "%p: user space\n", (void *)c);
    struct copy *copies = calloc(2, sizeof(*copies));
    c->shut[0] = 0;
    /* SIGTERM for the main thread only: it interrupts its epoll_wait. */
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &term, &old);
    for (int side = 0; side < 2; side++) {
        pthread_t thread;
        copies[side].conn = c;
        copies[side].side = side;
        pthread_create(&thread, NULL, copyThread, &copies[side]);
        pthread_detach(thread);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        closeConn(c);
        return;
    }
    c->connected = 1;
    keyOf(c->fd[0], &c->key[0]);
    keyOf(c->fd[1], &c->key[1]);
    if (counts >= 0) {
        uint64_t zero = 0;
        mapUpdate(counts, &c->key[0], &zero);
        mapUpdate(counts, &c->key[1], &zero);
    }
    /* The target first: the client's bytes (already waiting, for a
     * client-first protocol) find it when the client goes in. */
    uint32_t fd1 = (uint32_t)c->fd[1], fd0 = (uint32_t)c->fd[0];
    if (!established(c->fd[0]) || !established(c->fd[1])) {
        /* A side that already sent its FIN cannot go in the map
         * (EOPNOTSUPP: only established sockets may). */
        fallBack(c);
        return;
    }
    if (mapUpdate(sockhash, &c->key[0], &fd1) < 0) {
        fallBack(c);
        return;
    }
    if (mapUpdate(sockhash, &c->key[1], &fd0) < 0) {
        /* The client's FIN came in between: take the target out again
         * (what it had passed to its own queue is lost with it). */
        mapDelete(sockhash, &c->key[0]);
        fallBack(c);
        return;
    }
    /* Only the end of each direction concerns the relay: EPOLLRDHUP (the
     * FIN's state change) and not EPOLLIN: with it, the relay was woken
     * inside epoll_wait about once per request, with nothing to read
     * (docs/PERFORMANCE.md). */
    watch(EPOLL_CTL_MOD, c->fd[1], EPOLLRDHUP, &c->ends[1]);
    watch(EPOLL_CTL_ADD, c->fd[0], EPOLLRDHUP, &c->ends[0]);
    /* An EOF or an error met here: the level-triggered EPOLLRDHUP or
     * EPOLLERR reports it too. */
    flushPassed(c, 0);
    flushPassed(c, 1);
}

static void acceptAll(int listener)
{
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        int out = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(out, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct conn *c = calloc(1, sizeof(*c));
        c->fd[0] = fd;
        c->fd[1] = out;
        for (int side = 0; side < 2; side++) {
            c->ends[side].conn = c;
            c->ends[side].side = side;
        }
        if (connect(out, (struct sockaddr *)&targetAddr, sizeof(targetAddr)) < 0 && errno != EINPROGRESS) {
            closeConn(c);
            continue;
        }
        watch(EPOLL_CTL_ADD, out, EPOLLOUT, &c->ends[1]);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT TARGET_PORT [count] [drain] [verdict] [stats]\n", argv[0]);
        return 2;
    }
    int attachType = BPF_SK_SKB_STREAM_VERDICT;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "count"))
            counts = mapCreate(BPF_MAP_TYPE_HASH, sizeof(struct flowKey), 8, 65536);
        else if (!strcmp(argv[i], "drain"))
            drainMode = 1;
        else if (!strcmp(argv[i], "verdict"))
            attachType = BPF_SK_SKB_VERDICT;
        else if (!strcmp(argv[i], "stats"))
            enableStats();
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction term = {.sa_handler = onTerm};
    sigaction(SIGTERM, &term, NULL);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    sockhash = mapCreate(BPF_MAP_TYPE_SOCKHASH, sizeof(struct flowKey), 4, 65536);
    prog = loadVerdict();
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.target_fd = (uint32_t)sockhash;
    attr.attach_bpf_fd = (uint32_t)prog;
    attr.attach_type = (uint32_t)attachType;
    debug = getenv("SOCKMAP_DEBUG") != NULL;
    if (sysBPF(BPF_PROG_ATTACH, &attr) < 0) {
        fprintf(stderr, "sockmap: BPF_PROG_ATTACH: %s\n", strerror(errno));
        return 1;
    }

    targetAddr.sin_family = AF_INET;
    targetAddr.sin_port = htons((uint16_t)atoi(argv[2]));
    targetAddr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct sockaddr_in listenAddr = targetAddr;
    listenAddr.sin_port = htons((uint16_t)atoi(argv[1]));
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listener, (struct sockaddr *)&listenAddr, sizeof(listenAddr)) < 0 || listen(listener, 1024) < 0) {
        fprintf(stderr, "sockmap: listen on %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct end listening = {NULL, -1};
    watch(EPOLL_CTL_ADD, listener, EPOLLIN, &listening);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, pendingList ? 1 : -1);
        if (stopping) {
            fflush(stdout);
            fprintf(stderr, "sockmap: %lu connections relayed in user space\n", fallbacks);
            printStats();
            return 0;
        }
        for (int i = 0; i < n; i++) {
            struct end *end = events[i].data.ptr;
            if (!end->conn) {
                acceptAll(listener);
                continue;
            }
            struct conn *c = end->conn;
            if (c->closed)
                continue;
            if (!c->connected) {
                connected(c);
                continue;
            }
            if (debug) {
                int err = 0;
                socklen_t len = sizeof(err);
                getsockopt(c->fd[end->side], SOL_SOCKET, SO_ERROR, &err, &len);
                fprintf(stderr, "%p: side %d events %#x error %d\n", (void *)c, end->side, events[i].events, err);
            }
            if (events[i].events & EPOLLERR) {
                closeConn(c);
                continue;
            }
            sideEnded(c, end->side);
        }
        if (pendingList)
            checkPending();
        while (closedList) {
            struct conn *c = closedList;
            closedList = c->nextClosed;
            free(c);
        }
        fflush(stdout);
    }
}
