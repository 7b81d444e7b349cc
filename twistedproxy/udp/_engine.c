/*
 * twistedproxy.udp._engine: the compiled engine for established UDP sessions
 * (Linux only: epoll, eventfd, recvmmsg, IP_PKTINFO / IPV6_PKTINFO, and
 * UDP GSO where the kernel has it).
 *
 * It is built on the skeleton both engines share (../_engine.h:
 * descriptors, thread start, id table, report queue, vocabulary); its
 * flows are sessions.  One UDPEngine owns one background thread that never takes the GIL.  Python
 * (twistedproxy.udp) binds each listening socket and hands its descriptor
 * over with addListener(); the thread reads every datagram.  A datagram
 * from a client with a session is sent on the session's socket, which is
 * connected to the target; a reply read from that socket is sent to the
 * client from the listening socket, from the address the client sent to.
 *
 * A datagram from a client without a session is held (a few per client,
 * a bounded number of clients and bytes) and Python is told through an
 * eventfd (a 'new' report); it decides whether the client may have a
 * session and answers with adopt() (a connected socket it opened: the held
 * datagrams are sent on it) or dropPending().  Sessions quiet for their
 * timeout are ended by the thread and reported through the same eventfd;
 * each session's report slot is reserved at adopt, and PENDING_CLIENTS
 * slots for 'new' reports at construction.
 *
 * Locking (the rule of ../_engine.h): one mutex guards every table; the
 * thread takes it to look up, account and hold, never during recvmmsg,
 * sendmmsg, recv or sendmsg, and Python never holds it while it builds
 * Python objects.  The thread only sends: the datagrams held for a new
 * session leave from the thread too (adopt queues them), so that they go
 * before the client's next ones.  An object removed from epoll may still
 * have an event in the batch being handled; it is marked closed (checked
 * under the mutex) and freed by the thread after the batch.  A Python
 * method that removes a session or a listener waits for the batch in
 * progress to end before it closes a descriptor or returns, so that the
 * thread never uses a closed descriptor.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Datagrams read from one socket per readiness event, so that a flood on
 * one socket leaves every other socket its turn. */
#define DRAIN 64
/* The largest datagram the kernel hands over: nothing is truncated. */
#define MAX_DATAGRAM 65535
/* One UDP GSO send (Linux >= 4.18) carries at most this many datagrams
 * (the kernel's cap, 64 until 6.x raised it to 128) and this much payload
 * (it is built as one UDP datagram of one IPv4 packet, 65535 - 20 - 8
 * bytes, before the kernel cuts it). */
#define GSO_SEGMENTS 64
#define GSO_BYTES 65507
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
/* Clients without a session yet, datagrams held for each, and bytes held
 * for all of them: what a flood of new clients can cost. */
#define PENDING_CLIENTS 1024
#define PENDING_DATAGRAMS 8
#define PENDING_BYTES (4 * 1024 * 1024)
/* Longest gap between two sweeps for expired sessions, in milliseconds;
 * shorter when a session's timeout is under ten times this. */
#define SWEEP_GAP_MS 1000
/* The longest prefix a session may put before each datagram to its target:
 * a PROXY protocol v2 header for IPv6, 16 + 36 bytes, with room to spare. */
#define PREFIX_MAX 64

/* What a session does with PROXY v2 headers at the start of the client's
 * datagrams (accept_proxy_protocol): nothing, take them off (a listed
 * source; a malformed one drops the datagram), or drop datagrams that
 * carry one (any other source). */
enum { HEADERS_NONE = 0, HEADERS_TAKE = 1, HEADERS_REFUSE = 2 };
static const uint8_t PP2_SIGNATURE[12] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

enum { KIND_WAKE = 0, KIND_LISTENER = 1, KIND_SESSION = 2 };
enum { REPORT_NEW = 1, REPORT_ENDED = 2 };

/* What tells one client of one listener from another: the listener, the
 * client's address and the local address it sent to (zero when the
 * listener is bound to one address).  Always built zeroed, so it can be
 * hashed and compared as bytes. */
typedef struct {
    uint32_t listenerId;
    uint16_t family;
    uint16_t port;
    uint32_t scope;
    uint32_t unused;            /* keeps the size a multiple of 8 */
    uint8_t addr[16];
    uint8_t local[16];
} Key;

/* A key with what a reply to that client needs; it is what Python gets in
 * a 'new' report and gives back to adopt() or dropPending(). */
typedef struct {
    Key key;
    struct sockaddr_storage client;
    socklen_t clientLen;
    uint32_t ifindex;   /* IPv6: the interface the datagram came in on */
    int32_t haveLocal;
} Peer;

typedef struct Listener {
    int kind;
    int closed;
    int fd;
    int pktinfo;
    int family;
    uint32_t id;
    uint64_t dropped;           /* new clients' datagrams over the bounds */
    uint64_t limited;           /* datagrams over a session's rate */
    uint64_t sessions;
    struct Listener *next;
    struct Listener *nextDead;
} Listener;

typedef struct Session {
    int kind;
    int closed;
    int fd;
    Peer peer;
    Listener *listener;
    IdEntry entry;              /* flow id and chain in the id table */
    int64_t last;               /* ms, coarse monotonic clock */
    int64_t timeout;            /* ms */
    uint64_t bytesIn, bytesOut;
    int gso;                    /* runs may leave with UDP GSO */
    int headers;                /* HEADERS_*: PROXY headers from the client */
    size_t prefixLen;           /* bytes of prefix sent before each datagram */
    uint8_t prefix[PREFIX_MAX]; /* the client's PROXY v2 header, constant */
    /* The token bucket of the client's datagrams (datagrams_per_client):
     * rate in tokens per ms, 0 for no limit. */
    double rate, burst, tokens;
    int64_t stamp;
    struct Pending *held;       /* datagrams held before adopt, to send first */
    int flushQueued;            /* on the engine's flushing list */
    struct Session *nextByKey, *nextDead, *nextFlush;
    uint32_t pollStamp;         /* the busy-poll's window it was last counted in */
} Session;

typedef struct Pending {
    Peer peer;
    int count;
    uint64_t datagrams, bytes;  /* every datagram, held or dropped */
    size_t lens[PENDING_DATAGRAMS];
    char *data[PENDING_DATAGRAMS];
    size_t skips[PENDING_DATAGRAMS]; /* once a session's: header bytes to skip */
    struct Pending *next;
} Pending;

typedef struct Report {
    int type;                   /* REPORT_* */
    uint64_t flowId, bytesIn, bytesOut;
    Peer peer;
} Report;

typedef struct {
    ENGINE_HEAD
    int wakeKind;               /* epoll data for wakeFd points here */
    Listener *listeners;
    Listener *deadListeners;
    Session **byKey;            /* sessions by client key */
    size_t keyMask;
    Session *deadSessions;
    Pending **pending;          /* PENDING_CLIENTS buckets */
    size_t pendingCount, pendingBytes;
    size_t newSlots;            /* report slots reserved for 'new' reports */
    int64_t tick, nextSweep, sweepGap;
    char *buffers;              /* DRAIN x MAX_DATAGRAM */
    int gso;                    /* new sessions may use UDP GSO */
    uint64_t gsoSends;          /* sends that carried several datagrams;
                                 * the thread adds, relaxed atomics */
    Session *flushing;          /* sessions whose held datagrams wait */
    int inBatch;                /* the thread handles an epoll batch */
    int condReady;
    pthread_cond_t batchDone;   /* inBatch went back to 0 */
    AdaptivePoll poll;          /* the thread's, see ../_engine.h */
    int pollGate;               /* its gate (one thread: always open) */
} UDPEngine;

/* -- helpers ----------------------------------------------------------- */

static int64_t
nowMs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Random per process, so that clients cannot choose addresses and ports
 * that all land in one bucket. */
static uint64_t hashSeed = 0x9e3779b97f4a7c15ULL;

static uint64_t
hashKey(const Key *k)
{
    uint64_t h = hashSeed;
    for (size_t i = 0; i < sizeof(Key) / 8; i++) {
        uint64_t w;
        memcpy(&w, (const char *)k + 8 * i, 8);
        h ^= w;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
    }
    return h;
}

#define lockFromPython(self) engineLock((EngineBase *)(self))

static void
peerFromMessage(Peer *p, Listener *l, struct msghdr *msg)
{
    memset(p, 0, sizeof *p);
    p->key.listenerId = l->id;
    memcpy(&p->client, msg->msg_name, msg->msg_namelen);
    p->clientLen = msg->msg_namelen;
    struct sockaddr *sa = msg->msg_name;
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *s6 = msg->msg_name;
        p->key.family = AF_INET6;
        p->key.port = s6->sin6_port;
        p->key.scope = s6->sin6_scope_id;
        memcpy(p->key.addr, &s6->sin6_addr, 16);
    } else {
        struct sockaddr_in *s4 = msg->msg_name;
        p->key.family = AF_INET;
        p->key.port = s4->sin_port;
        memcpy(p->key.addr, &s4->sin_addr, 4);
    }
    if (!l->pktinfo)
        return;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof info);
            /* spec_dst: the local address to answer from (the
             * destination itself, or the interface's for a broadcast) */
            memcpy(p->key.local, &info.ipi_spec_dst, 4);
            p->haveLocal = 1;
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof info);
            memcpy(p->key.local, &info.ipi6_addr, 16);
            /* a link-local address is usable only with its interface */
            p->ifindex = info.ipi6_ifindex;
            p->haveLocal = 1;
        }
    }
}

static Session *
findSession(UDPEngine *self, const Key *k)
{
    Session *s = self->byKey[hashKey(k) & self->keyMask];
    while (s != NULL && memcmp(&s->peer.key, k, sizeof *k) != 0)
        s = s->nextByKey;
    return s;
}

static Session *
findFlow(UDPEngine *self, uint64_t flowId)
{
    IdEntry *entry = idTableFind(&self->flows, flowId);
    return entry == NULL ? NULL : ENTRY_OF(entry, Session, entry);
}

static Pending **
findPending(UDPEngine *self, const Key *k)
{
    Pending **pp = &self->pending[hashKey(k) % PENDING_CLIENTS];
    while (*pp != NULL && memcmp(&(*pp)->peer.key, k, sizeof *k) != 0)
        pp = &(*pp)->next;
    return pp;
}

static Listener *
findListener(UDPEngine *self, uint32_t id)
{
    for (Listener *l = self->listeners; l != NULL; l = l->next)
        if (l->id == id)
            return l;
    return NULL;
}

static void
freePending(UDPEngine *self, Pending *p)
{
    for (int i = 0; i < p->count; i++) {
        self->pendingBytes -= p->lens[i];
        free(p->data[i]);
    }
    self->pendingCount--;
    free(p);
}

/* Report that a session ended (lock held; never fails: adopt reserved
 * its slot). */
static void
postEnded(UDPEngine *self, Session *s)
{
    Report *r = reportPost(&self->reports);
    memset(r, 0, sizeof *r);
    r->type = REPORT_ENDED;
    r->flowId = s->entry.id;
    r->bytesIn = s->bytesIn;
    r->bytesOut = s->bytesOut;
}

/* Report a new client (lock held); -1 when the slots reserved for new
 * clients are all taken (reports() gives them back). */
static int
postNew(UDPEngine *self, const Peer *peer)
{
    if (self->newSlots == 0)
        return -1;
    self->newSlots--;
    Report *r = reportPost(&self->reports);
    memset(r, 0, sizeof *r);
    r->type = REPORT_NEW;
    r->peer = *peer;
    return 0;
}

/* Make room for one more session in the key table: 0, or -1. */
static int
growKeys(UDPEngine *self)
{
    if (self->flows.count + 1 <= self->keyMask + 1)
        return 0;
    size_t size = (self->keyMask + 1) * 2;
    Session **byKey = calloc(size, sizeof *byKey);
    if (byKey == NULL)
        return -1;
    for (size_t i = 0; i <= self->keyMask; i++) {
        for (Session *s = self->byKey[i], *next; s != NULL; s = next) {
            next = s->nextByKey;
            size_t b = hashKey(&s->peer.key) & (size - 1);
            s->nextByKey = byKey[b];
            byKey[b] = s;
        }
    }
    free(self->byKey);
    self->byKey = byKey;
    self->keyMask = size - 1;
    return 0;
}

/* Free the datagrams a session held, once sent or not to be sent. */
static void
freeHeld(Pending *p)
{
    if (p == NULL)
        return;
    for (int i = 0; i < p->count; i++)
        free(p->data[i]);
    free(p);
}

/* Take a session off the flushing list (lock held). */
static void
unqueueFlush(UDPEngine *self, Session *s)
{
    if (!s->flushQueued)
        return;
    Session **pp = &self->flushing;
    while (*pp != s)
        pp = &(*pp)->nextFlush;
    *pp = s->nextFlush;
    s->flushQueued = 0;
}

/* Remove a session from the tables and epoll (lock held); it is freed
 * after the current batch.  Its socket is closed here when closeNow (the
 * engine thread, or no thread), else returned for the caller to close
 * once the thread's batch is over (waitForBatch). */
static int
endSession(UDPEngine *self, Session *s, int closeNow)
{
    Session **pp = &self->byKey[hashKey(&s->peer.key) & self->keyMask];
    while (*pp != s)
        pp = &(*pp)->nextByKey;
    *pp = s->nextByKey;
    idTableRemove(&self->flows, &s->entry);
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, s->fd, NULL);
    int fd = s->fd;
    if (closeNow) {
        close(fd);
        fd = s->fd = -1;
    }
    /* else the thread may still send on s->fd until its batch ends: the
     * number stays, the caller closes it after waitForBatch */
    s->closed = 1;
    s->listener->sessions--;
    unqueueFlush(self, s);
    freeHeld(s->held);
    s->held = NULL;
    s->nextDead = self->deadSessions;
    self->deadSessions = s;
    return fd;
}

/* Python removed a session or a listener that the thread may be using in
 * the batch it handles: wait (lock held, released meanwhile, and the GIL
 * too) for that batch to end. */
static void
waitForBatch(UDPEngine *self)
{
    while (self->started && !self->joined && self->inBatch) {
        Py_BEGIN_ALLOW_THREADS
        pthread_cond_wait(&self->batchDone, &self->lock);
        Py_END_ALLOW_THREADS
    }
}

static void
freeDead(UDPEngine *self)
{
    while (self->deadSessions != NULL) {
        Session *s = self->deadSessions;
        self->deadSessions = s->nextDead;
        free(s);
    }
    while (self->deadListeners != NULL) {
        Listener *l = self->deadListeners;
        self->deadListeners = l->nextDead;
        free(l);
    }
}

/* -- the engine thread ------------------------------------------------- */

/* Take a token of the session's datagram bucket; 0 when it is empty: the
 * datagram is then dropped, and counted in the listener's limited. */
static int
takeToken(Session *s, int64_t now)
{
    double tokens = s->tokens;
    if (now > s->stamp) {
        tokens += (double)(now - s->stamp) * s->rate;
        s->stamp = now;
        if (tokens > s->burst)
            tokens = s->burst;
    }
    if (tokens >= 1.0) {
        s->tokens = tokens - 1.0;
        return 1;
    }
    s->tokens = tokens;
    s->listener->limited++;
    return 0;
}

static void
sendToTarget(Session *s, const char *data, size_t len)
{
    struct iovec iov[2] = {{s->prefix, s->prefixLen}, {(void *)data, len}};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    /* without a prefix, the datagram alone */
    msg.msg_iov = s->prefixLen ? iov : iov + 1;
    msg.msg_iovlen = s->prefixLen ? 2 : 1;
    if (sendmsg(s->fd, &msg, MSG_DONTWAIT) < 0 && errno == ECONNREFUSED) {
        /* A stale ICMP port-unreachable from an earlier datagram (the
         * target was not listening then) failed this send, which never
         * left: once more, so the first datagram after the target starts
         * listening gets through.  Any other failure loses the datagram,
         * as any network may. */
        (void)sendmsg(s->fd, &msg, MSG_DONTWAIT);
    }
}

/* How many bytes at the start of a client's datagram are a PROXY v2
 * header to take off, for a session's HEADERS_* mode; -1 when the
 * datagram must be dropped: a malformed header from a listed source, any
 * header from another.  The checks are proxyprotocol.parse's for v2. */
static long
headerLength(int mode, const uint8_t *data, size_t len)
{
    if (mode == HEADERS_NONE || len < 12 || memcmp(data, PP2_SIGNATURE, 12) != 0)
        return 0;
    if (mode == HEADERS_REFUSE || len < 16)
        return -1;
    uint8_t command = data[12], family = data[13] >> 4, transport = data[13] & 0xF;
    if ((command != 0x20 && command != 0x21) || family > 3 || transport > 2)
        return -1;
    size_t total = 16 + ((size_t)data[14] << 8 | data[15]);
    if (total > len)
        return -1;
    static const size_t needed[4] = {0, 12, 36, 216};
    if (command == 0x21 && family != 0 && transport != 0 && total - 16 < needed[family])
        return -1;
    return (long)total;
}

/* The bytes a message carries: the datagram, and a session's prefix. */
static size_t
messageLength(const struct msghdr *msg)
{
    size_t len = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++)
        len += msg->msg_iov[i].iov_len;
    return len;
}

/* Send msgs[0..count) on the session's socket with as few system calls as
 * the kernel allows, each datagram refused by a stale ICMP error retried
 * once as in sendToTarget. */
static void
sendRunToTarget(Session *s, struct mmsghdr *msgs, int count)
{
    int i = 0, retried = -1;
    while (i < count) {
        int sent = sendmmsg(s->fd, msgs + i, count - i, MSG_DONTWAIT);
        if (sent > 0) {
            i += sent;
            continue;
        }
        if (sent < 0 && errno == ECONNREFUSED && retried != i) {
            retried = i;
            continue;
        }
        /* this datagram is lost, as on any network; the next ones go on */
        i++;
    }
}

/* How many of msgs[0..count) can leave in one GSO send: the kernel cuts
 * its payload into segments of the first datagram's size, so all must
 * have that size but the last, which may be shorter (not empty: an empty
 * segment would vanish).  A session's prefix is part of every segment;
 * being the same before each datagram, it keeps equal sizes equal. */
static int
gsoSegments(const struct mmsghdr *msgs, int count)
{
    size_t size = messageLength(&msgs[0].msg_hdr), total = size;
    int n = 1;
    if (size == 0)
        return 1;
    while (n < count && n < GSO_SEGMENTS) {
        size_t len = messageLength(&msgs[n].msg_hdr);
        if (len == 0 || len > size || total + len > GSO_BYTES)
            break;
        total += len;
        n++;
        if (len < size)
            break;
    }
    return n;
}

/* Send msgs[0..count), one iovec each, or two with the session's prefix
 * (consecutive in memory, as readListener lays them out), in one sendmsg
 * that the kernel cuts back into the same datagrams.  A stale ICMP error is retried once, as in
 * sendToTarget.  Returns 1 when sent, 0 when lost as on any network, -1
 * when the kernel refuses GSO on this socket and nothing left. */
static int
sendSegments(Session *s, const struct mmsghdr *msgs, int count)
{
    char control[CMSG_SPACE(sizeof(uint16_t))];
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(control, 0, sizeof control);
    msg.msg_iov = msgs[0].msg_hdr.msg_iov;
    msg.msg_iovlen = (size_t)count * msgs[0].msg_hdr.msg_iovlen;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t size = (uint16_t)messageLength(&msgs[0].msg_hdr);
    memcpy(CMSG_DATA(c), &size, sizeof size);
    ssize_t sent = sendmsg(s->fd, &msg, MSG_DONTWAIT);
    if (sent < 0 && errno == ECONNREFUSED)
        sent = sendmsg(s->fd, &msg, MSG_DONTWAIT);
    if (sent >= 0)
        return 1;
    switch (errno) {
    case EINVAL:        /* SO_NO_CHECK; over an older kernel's segment cap */
    case EMSGSIZE:      /* a segment over the path MTU to the target */
    case EIO:           /* an IPsec route; no checksum offload (old kernels) */
    case ENOPROTOOPT:
    case EOPNOTSUPP:
        return -1;
    }
    return 0;
}

/* Send a run of one session's datagrams: each stretch that qualifies in
 * one GSO send, the others together with sendmmsg.  When the kernel
 * refuses GSO, the session stops trying and those datagrams, like the rest
 * of the run, go with sendmmsg: the refusal depends on the socket and its
 * route (SO_NO_CHECK, path MTU, IPsec), so other sessions keep GSO. */
static void
sendRun(UDPEngine *self, Session *s, struct mmsghdr *msgs, int count)
{
    int plain = 0, i = 0;       /* msgs[plain..i) wait for sendmmsg */
    while (s->gso && i < count) {
        int n = gsoSegments(msgs + i, count - i);
        if (n < 2) {
            i++;
            continue;
        }
        if (i > plain)
            sendRunToTarget(s, msgs + plain, i - plain);
        plain = i;
        int sent = sendSegments(s, msgs + i, n);
        if (sent < 0) {
            s->gso = 0;
            break;
        }
        __atomic_fetch_add(&self->gsoSends, (uint64_t)sent, __ATOMIC_RELAXED);
        i += n;
        plain = i;
    }
    if (count > plain)
        sendRunToTarget(s, msgs + plain, count - plain);
}

/* Hold a datagram of a client without a session (lock held); 1 when it
 * is the client's first, reported as 'new'. */
static int
holdDatagram(UDPEngine *self, Listener *l, const Peer *peer, const char *data, size_t len)
{
    int posted = 0;
    Pending **pp = findPending(self, &peer->key);
    Pending *p = *pp;
    if (p == NULL) {
        if (self->pendingCount >= PENDING_CLIENTS || (p = calloc(1, sizeof *p)) == NULL) {
            l->dropped++;
            return 0;
        }
        if (postNew(self, peer) < 0) {
            free(p);
            l->dropped++;
            return 0;
        }
        p->peer = *peer;
        *pp = p;
        self->pendingCount++;
        posted = 1;
    }
    p->datagrams++;
    p->bytes += len;
    if (p->count < PENDING_DATAGRAMS && self->pendingBytes + len <= PENDING_BYTES) {
        char *copy = malloc(len ? len : 1);
        if (copy != NULL) {
            memcpy(copy, data, len);
            p->data[p->count] = copy;
            p->lens[p->count++] = len;
            self->pendingBytes += len;
        }
    }
    return posted;
}

/* One session's datagrams msgs[start..end) of a readListener batch, and
 * what it held before it was adopted, to send after the lock. */
typedef struct {
    Session *s;
    Pending *held;
    int start, end;
} Run;

static void
queueRun(UDPEngine *self, Run *run, Session *s, int start, int end)
{
    run->s = s;
    run->held = s->held;
    s->held = NULL;
    unqueueFlush(self, s);
    run->start = start;
    run->end = end;
}

/* Send what a session held before it was adopted (thread, no lock). */
static void
sendHeld(Session *s, Pending *p)
{
    for (int i = 0; i < p->count; i++)
        sendToTarget(s, p->data[i] + p->skips[i], p->lens[i] - p->skips[i]);
}

/* Read a listener's waiting datagrams (one recvmmsg) and send them on:
 * the bytes read. */
static uint64_t
readListener(UDPEngine *self, Listener *l, int64_t now)
{
    struct mmsghdr msgs[DRAIN];
    struct iovec iovs[DRAIN];
    /* a session's prefix and the datagram, for sessions with a prefix:
     * msgs[i] then sends prefixed[2i..2i+1], so that a run's iovecs are
     * consecutive as sendSegments wants them */
    struct iovec prefixed[2 * DRAIN];
    struct sockaddr_storage names[DRAIN];
    char controls[DRAIN][CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo))];
    for (int i = 0; i < DRAIN; i++) {
        iovs[i].iov_base = self->buffers + (size_t)i * MAX_DATAGRAM;
        iovs[i].iov_len = MAX_DATAGRAM;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = l->pktinfo ? controls[i] : NULL;
        msgs[i].msg_hdr.msg_controllen = l->pktinfo ? sizeof controls[i] : 0;
        msgs[i].msg_hdr.msg_flags = 0;
    }
    pthread_mutex_lock(&self->lock);
    int closed = l->closed;
    pthread_mutex_unlock(&self->lock);
    if (closed)
        return 0;
    /* Python closes a removed listener's socket only after this batch. */
    int n = recvmmsg(l->fd, msgs, DRAIN, MSG_DONTWAIT, NULL);
    if (n <= 0)
        return 0;
    uint64_t read = 0;
    for (int i = 0; i < n; i++)
        read += msgs[i].msg_len;
    /* Under the lock, each datagram finds its session and is accounted
     * for; the sends are made after it.  Consecutive datagrams of one
     * session (a bulk sender) leave together (sendRun): msgs[start..end)
     * are reused as the outgoing messages of runs[k]. */
    Run runs[DRAIN];
    int runCount = 0;
    int reported = 0;
    Session *last = NULL;
    int runStart = 0;
    Peer peer;
    pthread_mutex_lock(&self->lock);
    if (l->closed)
        n = 0;  /* removed meanwhile: as if these came after */
    for (int i = 0; i < n; i++) {
        const char *data = iovs[i].iov_base;
        size_t len = msgs[i].msg_len;
        peerFromMessage(&peer, l, &msgs[i].msg_hdr);
        Session *s = last;
        if (s == NULL || memcmp(&s->peer.key, &peer.key, sizeof peer.key) != 0) {
            if (last != NULL)
                queueRun(self, &runs[runCount++], last, runStart, i);
            last = NULL;
            s = findSession(self, &peer.key);
        }
        if (s == NULL) {
            reported |= holdDatagram(self, l, &peer, data, len);
            continue;
        }
        s->last = now;
        if (s->rate > 0 && !takeToken(s, now)) {
            if (last != NULL)
                queueRun(self, &runs[runCount++], last, runStart, i);
            last = NULL;
            continue;
        }
        if (s->headers != HEADERS_NONE) {
            long skip = headerLength(s->headers, (const uint8_t *)data, len);
            if (skip < 0) {
                /* dropped: the run so far leaves, the next starts after */
                if (last != NULL)
                    queueRun(self, &runs[runCount++], last, runStart, i);
                last = NULL;
                l->dropped++;
                continue;
            }
            data += skip;
            len -= (size_t)skip;
            iovs[i].iov_base = (char *)data;
        }
        if (last == NULL)
            runStart = i;
        last = s;
        s->bytesIn += len;
        /* the outgoing message: this datagram, to the connected target */
        iovs[i].iov_len = len;
        if (s->prefixLen) {
            prefixed[2 * i].iov_base = s->prefix;
            prefixed[2 * i].iov_len = s->prefixLen;
            prefixed[2 * i + 1] = iovs[i];
            msgs[i].msg_hdr.msg_iov = &prefixed[2 * i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }
        msgs[i].msg_hdr.msg_name = NULL;
        msgs[i].msg_hdr.msg_namelen = 0;
        msgs[i].msg_hdr.msg_control = NULL;
        msgs[i].msg_hdr.msg_controllen = 0;
        msgs[i].msg_hdr.msg_flags = 0;
    }
    if (last != NULL)
        queueRun(self, &runs[runCount++], last, runStart, n);
    pthread_mutex_unlock(&self->lock);
    if (reported)
        signalFd(self->notifyFd);
    /* A session Python closes meanwhile keeps its socket until the batch
     * is over: its runs leave as they came before the close. */
    for (int k = 0; k < runCount; k++) {
        if (runs[k].held != NULL) {
            sendHeld(runs[k].s, runs[k].held);
            freeHeld(runs[k].held);
        }
        sendRun(self, runs[k].s, msgs + runs[k].start, runs[k].end - runs[k].start);
    }
    return read;
}

/* Send the held datagrams of sessions adopted since the last wake-up
 * (thread; the sends without the lock). */
static void
flushHeld(UDPEngine *self)
{
    for (;;) {
        pthread_mutex_lock(&self->lock);
        Session *s = self->flushing;
        Pending *held = NULL;
        if (s != NULL) {
            self->flushing = s->nextFlush;
            s->flushQueued = 0;
            held = s->held;
            s->held = NULL;
        }
        pthread_mutex_unlock(&self->lock);
        if (s == NULL)
            return;
        if (held != NULL) {
            sendHeld(s, held);
            freeHeld(held);
        }
    }
}

/* Send count replies, msgs[i] with iovs[i], to the session's client
 * from the listening socket, in one sendmmsg: each message gets the
 * client's address and, where the client sent to an address of its
 * choosing, that address as the source. */
static void
repliesToClient(Session *s, struct mmsghdr *msgs, struct iovec *iovs, int count)
{
    Listener *l = s->listener;
    char control[CMSG_SPACE(sizeof(struct in6_pktinfo))];
    size_t controlLen = 0;
    if (s->peer.haveLocal) {
        /* answer from the address the client sent to */
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        struct cmsghdr *c;
        if (s->peer.key.family == AF_INET6) {
            msg.msg_controllen = controlLen = CMSG_SPACE(sizeof(struct in6_pktinfo));
            c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = IPPROTO_IPV6;
            c->cmsg_type = IPV6_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
            struct in6_pktinfo info;
            memset(&info, 0, sizeof info);
            memcpy(&info.ipi6_addr, s->peer.key.local, 16);
            info.ipi6_ifindex = s->peer.ifindex;
            memcpy(CMSG_DATA(c), &info, sizeof info);
        } else {
            msg.msg_controllen = controlLen = CMSG_SPACE(sizeof(struct in_pktinfo));
            c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = IPPROTO_IP;
            c->cmsg_type = IP_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
            /* no interface: routing picks it, only the source is fixed */
            struct in_pktinfo info;
            memset(&info, 0, sizeof info);
            memcpy(&info.ipi_spec_dst, s->peer.key.local, 4);
            memcpy(CMSG_DATA(c), &info, sizeof info);
        }
    }
    for (int i = 0; i < count; i++) {
        struct msghdr *m = &msgs[i].msg_hdr;
        memset(m, 0, sizeof *m);
        m->msg_name = &s->peer.client;
        m->msg_namelen = s->peer.clientLen;
        m->msg_iov = &iovs[i];
        m->msg_iovlen = 1;
        m->msg_control = controlLen ? control : NULL;
        m->msg_controllen = controlLen;
    }
    /* A full send buffer loses the replies from there on, as any network
     * may: what sendmmsg did not send is dropped. */
    (void)sendmmsg(l->fd, msgs, (unsigned)count, MSG_DONTWAIT);
}

/*
 * Read the replies waiting on a session's socket and send them to its
 * client: one recvmmsg of up to DRAIN datagrams, so that a lone reply
 * costs one call, not a second that finds nothing (the socket is
 * level-triggered: what is left over wakes the thread again).  The bytes
 * read.
 */
static uint64_t
readSession(UDPEngine *self, Session *s, int64_t now)
{
    pthread_mutex_lock(&self->lock);
    int closed = s->closed;
    pthread_mutex_unlock(&self->lock);
    if (closed)
        return 0;
    /* The socket, the peer and the listener's socket stay as they are
     * until this batch is over, whatever Python does meanwhile. */
    struct mmsghdr msgs[DRAIN];
    struct iovec iovs[DRAIN];
    int n = -1;
    /* An ICMP error for an earlier datagram (nothing listening at the
     * target yet, host unreachable) fails the call and is consumed by
     * it; the session goes on, and what follows the error is read.  The
     * number of tries is bounded, so that a flood of errors cannot hold
     * the thread. */
    for (int tries = 0; tries < DRAIN && n < 0; tries++) {
        for (int i = 0; i < DRAIN; i++) {
            iovs[i].iov_base = self->buffers + (size_t)i * MAX_DATAGRAM;
            iovs[i].iov_len = MAX_DATAGRAM;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        n = recvmmsg(s->fd, msgs, DRAIN, MSG_DONTWAIT, NULL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
    }
    if (n <= 0)
        return 0;
    uint64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        iovs[i].iov_len = msgs[i].msg_len;
        bytes += msgs[i].msg_len;
    }
    repliesToClient(s, msgs, iovs, n);
    pollSawFlow(&self->poll, &s->pollStamp);
    pthread_mutex_lock(&self->lock);
    s->last = now;
    s->bytesOut += bytes;
    pthread_mutex_unlock(&self->lock);
    return bytes;
}

/* End the sessions quiet for their timeout (lock held); 1 when it ended
 * some, which the caller signals after the lock. */
static int
sweep(UDPEngine *self, int64_t now)
{
    int64_t gap = SWEEP_GAP_MS;
    int ended = 0;
    for (size_t i = 0; i <= self->keyMask; i++) {
        Session *s = self->byKey[i];
        while (s != NULL) {
            Session *next = s->nextByKey;
            /* the coarse clock may lag by a tick: never end a session early */
            if (now - s->last >= s->timeout + self->tick) {
                postEnded(self, s);
                endSession(self, s, 1);
                ended = 1;
            } else if (s->timeout / 10 < gap) {
                gap = s->timeout / 10;
            }
            s = next;
        }
    }
    if (gap < 1)
        gap = 1;
    self->sweepGap = gap;
    self->nextSweep = now + gap;
    return ended;
}

static void *
run(void *arg)
{
    UDPEngine *self = arg;
    struct epoll_event events[64];
    int eligible = 0, lastKinds = 0;
    for (;;) {
        /* The end of a batch: free what was removed during it, and let a
         * Python method waiting for it (waitForBatch) go on. */
        pthread_mutex_lock(&self->lock);
        freeDead(self);
        self->inBatch = 0;
        pthread_cond_broadcast(&self->batchDone);
        int wait = -1;
        int64_t now = nowMs();
        if (self->flows.count > 0) {
            wait = (int)(self->nextSweep - now);
            if (wait < 0)
                wait = 0;
        }
        int stopping = self->stopping;
        pthread_mutex_unlock(&self->lock);
        if (stopping)
            break;
        int n = pollWait(&self->poll, self->epfd, events, 64, wait, eligible);
        pthread_mutex_lock(&self->lock);
        self->inBatch = 1;
        pthread_mutex_unlock(&self->lock);
        now = nowMs();
        pollBatch(&self->poll, now);
        /* What the batch read: requests from clients (1), replies from
         * targets (2), and how many bytes. */
        int kinds = 0;
        uint64_t bytes = 0;
        for (int i = 0; i < n; i++) {
            int *kind = events[i].data.ptr;
            uint64_t read;
            if (*kind == KIND_WAKE) {
                drainFd(self->wakeFd);
                flushHeld(self);
            } else if (*kind == KIND_LISTENER) {
                read = readListener(self, (Listener *)kind, now);
                kinds |= read ? 1 : 0;
                bytes += read;
            } else {
                read = readSession(self, (Session *)kind, now);
                kinds |= read ? 2 : 0;
                bytes += read;
            }
        }
        /* Poll (the busy-poll of ../_engine.h) only after a
         * small batch that read the other way from the batch before it
         * (request/response traffic: the answer is likely microseconds
         * away); a one-way stream never turns and never polls. */
        eligible = kinds != 0 && lastKinds != 0 && kinds != lastKinds && bytes < POLL_MAX_BATCH &&
                   pollFewFlows(&self->poll);
        if (kinds != 0)
            lastKinds = kinds;
        pthread_mutex_lock(&self->lock);
        int ended = self->flows.count > 0 && now >= self->nextSweep && sweep(self, now);
        pthread_mutex_unlock(&self->lock);
        if (ended)
            signalFd(self->notifyFd);
    }
    return NULL;
}

/* -- Python methods ---------------------------------------------------- */

static int
checkOpen(UDPEngine *self)
{
    if (self->epfd < 0 || self->stopping) {
        PyErr_SetString(PyExc_RuntimeError, "the UDP engine is stopped");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(addListener_doc,
"addListener(fd, listenerId, pktinfo) -> None\n\n"
"Read the bound, non-blocking UDP socket fd for listener listenerId (an\n"
"int unique in the engine).  pktinfo: the socket delivers IP_PKTINFO /\n"
"IPV6_PKTINFO (a wildcard listener), so sessions are kept per local\n"
"address too and replies leave from it.  The caller keeps the socket and\n"
"closes it after removeListener().");

static PyObject *
UDPEngine_addListener(UDPEngine *self, PyObject *args)
{
    int fd, pktinfo;
    unsigned int id;
    if (!PyArg_ParseTuple(args, "iIp", &fd, &id, &pktinfo))
        return NULL;
    if (checkOpen(self) < 0)
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Listener *l = calloc(1, sizeof *l);
    if (l == NULL)
        return PyErr_NoMemory();
    l->kind = KIND_LISTENER;
    l->fd = fd;
    l->id = id;
    l->pktinfo = pktinfo;
    l->family = ss.ss_family;
    lockFromPython(self);
    if (findListener(self, id) != NULL) {
        pthread_mutex_unlock(&self->lock);
        free(l);
        PyErr_Format(PyExc_ValueError, "listener %u is already read", id);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        pthread_mutex_unlock(&self->lock);
        free(l);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    l->next = self->listeners;
    self->listeners = l;
    int started = engineStartThread((EngineBase *)self, run);
    pthread_mutex_unlock(&self->lock);
    if (started < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A list of (flowId, bytesIn, bytesOut) from rows of three, built after
 * the lock is released. */
static PyObject *
endedList(const uint64_t *rows, size_t count)
{
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; list != NULL && i < count; i++) {
        PyObject *t = Py_BuildValue("KKK", (unsigned long long)rows[3 * i],
                                    (unsigned long long)rows[3 * i + 1],
                                    (unsigned long long)rows[3 * i + 2]);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* End a session that Python asked to end (lock held), copying its counters
 * to row[0..3): its end is returned at once, so its report slot is given
 * back. */
static int
endSessionNow(UDPEngine *self, Session *s, uint64_t *row)
{
    row[0] = s->entry.id;
    row[1] = s->bytesIn;
    row[2] = s->bytesOut;
    reportRelease(&self->reports);
    return endSession(self, s, !self->started || self->joined);
}

/* Close the sockets of sessions Python ended, once waitForBatch returned. */
static void
closeAll(const int *fds, size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

PyDoc_STRVAR(removeListener_doc,
"removeListener(listenerId) -> [(flowId, bytesIn, bytesOut), ...]\n\n"
"Stop reading the listener's socket, end its sessions (their sockets are\n"
"closed) and drop its held datagrams; returns the sessions ended.  The\n"
"caller closes the listening socket afterwards.");

static PyObject *
UDPEngine_removeListener(UDPEngine *self, PyObject *arg)
{
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    lockFromPython(self);
    Listener **lp = &self->listeners;
    while (*lp != NULL && (*lp)->id != id)
        lp = &(*lp)->next;
    Listener *l = *lp;
    uint64_t *rows = NULL;
    int *fds = NULL;
    if (l != NULL && ((rows = malloc((l->sessions + 1) * 3 * sizeof *rows)) == NULL ||
                      (fds = malloc((l->sessions + 1) * sizeof *fds)) == NULL)) {
        pthread_mutex_unlock(&self->lock);
        free(rows);
        return PyErr_NoMemory();
    }
    if (l == NULL) {
        pthread_mutex_unlock(&self->lock);
        return PyList_New(0);
    }
    *lp = l->next;
    epoll_ctl(self->epfd, EPOLL_CTL_DEL, l->fd, NULL);
    l->closed = 1;
    l->nextDead = self->deadListeners;
    self->deadListeners = l;
    size_t count = 0;
    for (size_t i = 0; i <= self->keyMask; i++) {
        Session *s = self->byKey[i];
        while (s != NULL) {
            Session *next = s->nextByKey;
            if (s->listener == l) {
                fds[count] = endSessionNow(self, s, rows + 3 * count);
                count++;
            }
            s = next;
        }
    }
    for (size_t b = 0; b < PENDING_CLIENTS; b++) {
        Pending **pp = &self->pending[b];
        while (*pp != NULL) {
            Pending *p = *pp;
            if (p->peer.key.listenerId == id) {
                *pp = p->next;
                freePending(self, p);
            } else {
                pp = &p->next;
            }
        }
    }
    /* The caller closes the listening socket when this returns. */
    waitForBatch(self);
    if (!self->started)
        freeDead(self);
    pthread_mutex_unlock(&self->lock);
    closeAll(fds, count);
    free(fds);
    PyObject *result = endedList(rows, count);
    free(rows);
    return result;
}

static int
parsePeer(PyObject *arg, Peer *peer)
{
    char *data;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(arg, &data, &len) < 0)
        return -1;
    if (len != (Py_ssize_t)sizeof *peer) {
        PyErr_SetString(PyExc_ValueError, "not a client key of this engine");
        return -1;
    }
    memcpy(peer, data, sizeof *peer);
    return 0;
}

PyDoc_STRVAR(adopt_doc,
"adopt(key, fd, flowId, timeout, prefix=b'', headers=0, rate=0.0, burst=0)"
" -> None\n\n"
"Open a session for the client of key (from a 'new' report): fd is a\n"
"non-blocking UDP socket connected to the target, which the engine now\n"
"owns and closes when the session ends.  The datagrams held for the\n"
"client are sent on it at once; bytesIn counts every datagram the client\n"
"sent, and those not held count in the listener's dropped.  flowId: an int\n"
"unique in the engine; timeout: seconds without a datagram either way\n"
"after which the engine ends the session and reports it.  prefix: bytes\n"
"sent before every datagram to the target (a PROXY v2 header; at most\n"
"64), replies are not changed.  headers: what to do with a PROXY v2\n"
"header at the start of the client's datagrams: 0 nothing, 1 take it off\n"
"(dropping the datagram when it is malformed), 2 drop datagrams with one;\n"
"dropped ones count in the listener's dropped.  rate: datagrams per\n"
"second from the client that go on to the target, burst at once (a token\n"
"bucket, full at first); those over it are dropped and counted in the\n"
"listener's limited.  0 is no limit.  On an error the caller keeps fd.");

static PyObject *
UDPEngine_adopt(UDPEngine *self, PyObject *args)
{
    PyObject *keyObject;
    int fd;
    unsigned long long flowId;
    double timeout, rate = 0.0;
    Py_buffer prefix = {0};
    int headers = HEADERS_NONE;
    unsigned int burst = 0;
    if (!PyArg_ParseTuple(args, "OiKd|y*idI", &keyObject, &fd, &flowId, &timeout, &prefix,
                          &headers, &rate, &burst))
        return NULL;
    if (headers < HEADERS_NONE || headers > HEADERS_REFUSE) {
        if (prefix.buf != NULL)
            PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "headers must be 0, 1 or 2");
        return NULL;
    }
    size_t prefixLen = prefix.buf != NULL ? (size_t)prefix.len : 0;
    uint8_t prefixBytes[PREFIX_MAX];
    if (prefixLen > PREFIX_MAX) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "prefix longer than 64 bytes");
        return NULL;
    }
    if (prefixLen)
        memcpy(prefixBytes, prefix.buf, prefixLen);
    if (prefix.buf != NULL)
        PyBuffer_Release(&prefix);
    Peer peer;
    if (parsePeer(keyObject, &peer) < 0 || checkOpen(self) < 0)
        return NULL;
    if (!(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be positive");
        return NULL;
    }
    if (!(rate >= 0) || (rate > 0 && burst < 1)) {
        PyErr_SetString(PyExc_ValueError, "rate must not be negative, and a rate needs a burst of 1 or more");
        return NULL;
    }
    Session *s = calloc(1, sizeof *s);
    if (s == NULL)
        return PyErr_NoMemory();
    s->kind = KIND_SESSION;
    s->fd = fd;
    s->peer = peer;
    s->entry.id = flowId;
    s->gso = self->gso;
    s->headers = headers;
    s->prefixLen = prefixLen;
    if (prefixLen)
        memcpy(s->prefix, prefixBytes, prefixLen);
    s->timeout = timeout * 1000 > 1e15 ? (int64_t)1e15 : (int64_t)(timeout * 1000);
    if (s->timeout < 1)
        s->timeout = 1;
    s->last = nowMs();
    s->rate = rate / 1000.0;
    s->burst = s->tokens = (double)burst;
    s->stamp = s->last;
    /* Why an adopt is refused, and what the ValueError says. */
    enum { ADOPTED, NO_LISTENER, HAS_SESSION, ID_IN_USE } outcome = ADOPTED;
    static const char *const refusals[] = {
        [NO_LISTENER] = "the listener is not read by the engine",
        [HAS_SESSION] = "the client has a session already",
        [ID_IN_USE] = "the flow id is in use",
    };
    lockFromPython(self);
    Listener *l = findListener(self, peer.key.listenerId);
    if (l == NULL)
        outcome = NO_LISTENER;
    else if (findSession(self, &peer.key) != NULL)
        outcome = HAS_SESSION;
    else if (findFlow(self, flowId) != NULL)
        outcome = ID_IN_USE;
    if (outcome != ADOPTED) {
        pthread_mutex_unlock(&self->lock);
        free(s);
        PyErr_SetString(PyExc_ValueError, refusals[outcome]);
        return NULL;
    }
    if (growKeys(self) < 0 || idTableMakeRoom(&self->flows) < 0 ||
        reportReserve(&self->reports, 1) < 0) {
        pthread_mutex_unlock(&self->lock);
        free(s);
        return PyErr_NoMemory();
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        pthread_mutex_unlock(&self->lock);
        reportRelease(&self->reports);
        free(s);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    s->listener = l;
    l->sessions++;
    size_t b = hashKey(&peer.key) & self->keyMask;
    s->nextByKey = self->byKey[b];
    self->byKey[b] = s;
    idTableInsert(&self->flows, &s->entry); /* has room: cannot fail */
    int wake = 0;
    Pending **pp = findPending(self, &peer.key);
    Pending *p = *pp;
    if (p != NULL) {
        *pp = p->next;
        s->bytesIn = p->bytes;
        /* Those not held are lost now.  Counted here, not when they came:
         * a client that Python rejects instead has every datagram counted
         * as rejected, as without the engine. */
        l->dropped += p->datagrams - (uint64_t)p->count;
        size_t held = 0;
        for (int i = 0; i < p->count; i++)
            held += p->lens[i];
        int kept = 0;
        for (int i = 0; i < p->count; i++) {
            if (s->rate > 0 && !takeToken(s, s->last)) {
                s->bytesIn -= p->lens[i];
                free(p->data[i]);
                continue;
            }
            long skip = headerLength(s->headers, (const uint8_t *)p->data[i], p->lens[i]);
            if (skip < 0) {
                l->dropped++;
                s->bytesIn -= p->lens[i];
                free(p->data[i]);
                continue;
            }
            s->bytesIn -= (uint64_t)skip;
            /* kept, to be sent by the thread before the client's next */
            p->data[kept] = p->data[i];
            p->lens[kept] = p->lens[i];
            p->skips[kept++] = (size_t)skip;
        }
        p->count = kept;
        self->pendingCount--;
        self->pendingBytes -= held;
        if (kept > 0) {
            s->held = p;
            s->nextFlush = self->flushing;
            self->flushing = s;
            s->flushQueued = 1;
            wake = 1;
        } else {
            free(p);
        }
    }
    int64_t gap = s->timeout / 10 < SWEEP_GAP_MS ? s->timeout / 10 : SWEEP_GAP_MS;
    if (gap < 1)
        gap = 1;
    if (self->flows.count == 1 || s->last + gap < self->nextSweep) {
        self->nextSweep = s->last + gap;
        wake = 1;
    }
    pthread_mutex_unlock(&self->lock);
    if (wake)
        signalFd(self->wakeFd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(dropPending_doc,
"dropPending(key) -> (datagrams, bytes)\n\n"
"Drop what is held for the client of key (from a 'new' report) and say how\n"
"much it sent meanwhile, held or not; (0, 0) when nothing is held.");

PyDoc_STRVAR(firstPending_doc,
"firstPending(key) -> bytes or None\n\n"
"The first datagram held for the client of key (from a 'new' report), or\n"
"None when none is held: what a listener with accept_proxy_protocol reads\n"
"the client's PROXY header from before it opens the session.");

static PyObject *
UDPEngine_firstPending(UDPEngine *self, PyObject *arg)
{
    Peer peer;
    if (parsePeer(arg, &peer) < 0)
        return NULL;
    char *copy = NULL;
    size_t len = 0;
    int found = 0;
    lockFromPython(self);
    Pending *p = *findPending(self, &peer.key);
    if (p != NULL && p->count > 0) {
        len = p->lens[0];
        copy = malloc(len ? len : 1);
        if (copy != NULL) {
            memcpy(copy, p->data[0], len);
            found = 1;
        }
    }
    pthread_mutex_unlock(&self->lock);
    if (!found) {
        if (p != NULL && p->count > 0)
            return PyErr_NoMemory();
        Py_RETURN_NONE;
    }
    PyObject *result = PyBytes_FromStringAndSize(copy, (Py_ssize_t)len);
    free(copy);
    return result;
}

static PyObject *
UDPEngine_dropPending(UDPEngine *self, PyObject *arg)
{
    Peer peer;
    if (parsePeer(arg, &peer) < 0)
        return NULL;
    unsigned long long datagrams = 0, bytes = 0;
    lockFromPython(self);
    Pending **pp = findPending(self, &peer.key);
    Pending *p = *pp;
    if (p != NULL) {
        *pp = p->next;
        datagrams = p->datagrams;
        bytes = p->bytes;
        freePending(self, p);
    }
    pthread_mutex_unlock(&self->lock);
    return Py_BuildValue("KK", datagrams, bytes);
}

PyDoc_STRVAR(close_doc,
"close(flowId) -> (bytesIn, bytesOut) or None\n\n"
"End a session now (its socket is closed) and return its counters; None\n"
"when the engine has no such session (it ended already, and its 'ended'\n"
"report is waiting).");

static PyObject *
UDPEngine_close(UDPEngine *self, PyObject *arg)
{
    uint64_t flowId;
    if (parseFlowId(arg, &flowId) < 0)
        return NULL;
    lockFromPython(self);
    Session *s = findFlow(self, flowId);
    if (s == NULL) {
        pthread_mutex_unlock(&self->lock);
        Py_RETURN_NONE;
    }
    uint64_t row[3];
    int fd = endSessionNow(self, s, row);
    waitForBatch(self);
    if (!self->started)
        freeDead(self);
    pthread_mutex_unlock(&self->lock);
    closeAll(&fd, 1);
    return Py_BuildValue("KK", (unsigned long long)row[1], (unsigned long long)row[2]);
}

PyDoc_STRVAR(counters_doc,
"counters(flowId) -> (bytesIn, bytesOut) or None\n\n"
"Bytes from the client and to the client of a session so far.");

static PyObject *
UDPEngine_counters(UDPEngine *self, PyObject *arg)
{
    uint64_t flowId;
    if (parseFlowId(arg, &flowId) < 0)
        return NULL;
    lockFromPython(self);
    Session *s = findFlow(self, flowId);
    unsigned long long in = s ? s->bytesIn : 0, out = s ? s->bytesOut : 0;
    pthread_mutex_unlock(&self->lock);
    if (s == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("KK", in, out);
}

PyDoc_STRVAR(listenerCounters_doc,
"listenerCounters(listenerId) -> (sessions, dropped, limited) or None\n\n"
"Open sessions of a listener; datagrams from new clients it dropped\n"
"because too many clients (1024) were held already, or, once their\n"
"session opened, that it had not held (over 8 for the client, or 4 MiB\n"
"for all); and datagrams of sessions dropped over their rate.");

static PyObject *
UDPEngine_listenerCounters(UDPEngine *self, PyObject *arg)
{
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    lockFromPython(self);
    Listener *l = findListener(self, id);
    unsigned long long sessions = l ? l->sessions : 0, dropped = l ? l->dropped : 0;
    unsigned long long limited = l ? l->limited : 0;
    pthread_mutex_unlock(&self->lock);
    if (l == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("KKK", sessions, dropped, limited);
}

static PyObject *
clientTuple(const Peer *p)
{
    char host[INET6_ADDRSTRLEN];
    int port;
    if (p->client.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&p->client;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host);
        port = ntohs(s6->sin6_port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&p->client;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host);
        port = ntohs(s4->sin_port);
    }
    return Py_BuildValue("(si)", host, port);
}

PyDoc_STRVAR(reports_doc,
"reports() -> list\n\n"
"What happened since the last call, oldest first, and clear the eventfd\n"
"of fileno():\n"
"  ('new', listenerId, key, (host, port)): a client without a session sent\n"
"      a datagram, which is held; answer with adopt or dropPending.\n"
"  ('ended', flowId, bytesIn, bytesOut): a session was quiet for its\n"
"      timeout and the engine ended it.");

static PyObject *
UDPEngine_reports(UDPEngine *self, PyObject *unused)
{
    if (self->notifyFd >= 0)
        drainFd(self->notifyFd);
    const char *items;
    lockFromPython(self);
    size_t count = reportsQueued(&self->reports, &items);
    pthread_mutex_unlock(&self->lock);
    /* Built without the lock: the engine thread only appends after them. */
    PyObject *result = PyList_New((Py_ssize_t)count);
    size_t taken = 0;
    for (size_t i = 0; result != NULL && i < count; i++) {
        const Report *r = (const Report *)items + i;
        PyObject *t;
        if (r->type == REPORT_NEW) {
            taken++;
            PyObject *client = clientTuple(&r->peer);
            t = client == NULL ? NULL : Py_BuildValue(
                "(sIy#N)", "new", r->peer.key.listenerId,
                (const char *)&r->peer, (Py_ssize_t)sizeof r->peer, client);
        } else {
            t = Py_BuildValue("(sKKK)", "ended", (unsigned long long)r->flowId,
                              (unsigned long long)r->bytesIn,
                              (unsigned long long)r->bytesOut);
        }
        if (t == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, (Py_ssize_t)i, t);
    }
    if (result == NULL) {
        /* Out of memory: the reports stay queued for the next call. */
        if (self->notifyFd >= 0)
            signalFd(self->notifyFd);
        return NULL;
    }
    lockFromPython(self);
    reportsTaken(&self->reports, count);
    /* The slots of the 'new' reports taken serve the next new clients. */
    if (taken > 0 && reportReserve(&self->reports, taken) == 0)
        self->newSlots += taken;
    pthread_mutex_unlock(&self->lock);
    return result;
}

PyDoc_STRVAR(gsoSends_doc,
"gsoSends() -> int\n\n"
"Sends so far that carried several datagrams of a session at once with\n"
"UDP GSO; 0 with UDPEngine(gso=False), on a kernel without it, and for\n"
"sessions whose socket refused it (they send each datagram).");

static PyObject *
UDPEngine_gsoSends(UDPEngine *self, PyObject *unused)
{
    lockFromPython(self);
    unsigned long long n = __atomic_load_n(&self->gsoSends, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromUnsignedLongLong(n);
}

PyDoc_STRVAR(stop_doc,
"stop() -> [(flowId, bytesIn, bytesOut), ...]\n\n"
"Join the engine thread, end every session (their sockets are closed)\n"
"and return them; listening sockets stay open for their owners.  The\n"
"engine cannot be used afterwards.  Safe to call more than once.");

static PyObject *
UDPEngine_stop(UDPEngine *self, PyObject *unused)
{
    if (self->epfd < 0)
        return PyList_New(0);
    lockFromPython(self);
    self->stopping = 1;
    pthread_mutex_unlock(&self->lock);
    engineJoin((EngineBase *)self);
    /* the thread is gone: nothing else touches the tables */
    uint64_t *rows = malloc((self->flows.count + 1) * 3 * sizeof *rows);
    size_t count = 0;
    for (size_t i = 0; i <= self->keyMask; i++) {
        Session *s = self->byKey[i];
        while (s != NULL) {
            Session *next = s->nextByKey;
            if (rows != NULL)
                endSessionNow(self, s, rows + 3 * count++);
            else
                endSession(self, s, 1);
            s = next;
        }
    }
    while (self->listeners != NULL) {
        Listener *l = self->listeners;
        self->listeners = l->next;
        l->nextDead = self->deadListeners;
        self->deadListeners = l;
    }
    for (size_t b = 0; b < PENDING_CLIENTS; b++) {
        while (self->pending[b] != NULL) {
            Pending *p = self->pending[b];
            self->pending[b] = p->next;
            freePending(self, p);
        }
    }
    self->reports.count = 0;
    freeDead(self);
    close(self->epfd);
    close(self->wakeFd);
    close(self->notifyFd);
    self->epfd = self->wakeFd = self->notifyFd = -1;
    if (self->started) {
        self->started = 0;
        Py_DECREF(self);
    }
    if (rows == NULL)
        return PyErr_NoMemory();
    PyObject *result = endedList(rows, count);
    free(rows);
    return result;
}

static int
gsoAvailable(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int size = 1024;
    int ok = setsockopt(fd, SOL_UDP, UDP_SEGMENT, &size, sizeof size) == 0;
    close(fd);
    return ok;
}

static int
UDPEngine_init(UDPEngine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"gso", "busyPoll", NULL};
    int gso = 1;
    long busyPoll = POLL_DEFAULT_CEILING_US;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pl", kwlist, &gso, &busyPoll))
        return -1;
    if (busyPoll < 0 || busyPoll > 1000000) {
        PyErr_SetString(PyExc_ValueError, "busyPoll must be between 0 and 1000000 microseconds");
        return -1;
    }
    if (self->epfd >= 0 || self->byKey != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "engine already initialised");
        return -1;
    }
    if (pthread_cond_init(&self->batchDone, NULL) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->condReady = 1;
    self->keyMask = 255;
    self->byKey = calloc(self->keyMask + 1, sizeof(Session *));
    self->pending = calloc(PENDING_CLIENTS, sizeof(Pending *));
    self->buffers = malloc((size_t)DRAIN * MAX_DATAGRAM);
    if (!self->byKey || !self->pending || !self->buffers) {
        PyErr_NoMemory();
        return -1;
    }
    self->wakeKind = KIND_WAKE;
    if (engineOpen((EngineBase *)self, (epoll_data_t){.ptr = &self->wakeKind}, 256,
                   sizeof(Report)) < 0)
        return -1;
    /* Every client held may have its 'new' report queued. */
    if (reportReserve(&self->reports, PENDING_CLIENTS) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->newSlots = PENDING_CLIENTS;
    /* A kernel without UDP GSO (before 4.18) would ignore the cmsg and
     * send a run as one datagram: use it only where the option exists. */
    self->gso = gso && gsoAvailable();
    pollInit(&self->poll, busyPoll, &self->pollGate);
    struct timespec res;
    clock_getres(CLOCK_MONOTONIC_COARSE, &res);
    self->tick = res.tv_sec * 1000 + (res.tv_nsec + 999999) / 1000000;
    return 0;
}

static void
UDPEngine_dealloc(UDPEngine *self)
{
    /* A started engine holds a reference to itself until stop(), so here
     * the thread was never started or is joined. */
    if (self->epfd >= 0 && self->byKey != NULL && self->pending != NULL) {
        PyObject *r = UDPEngine_stop(self, NULL);
        Py_XDECREF(r);
        PyErr_Clear();
    }
    free(self->byKey);
    free(self->pending);
    free(self->buffers);
    if (self->condReady)
        pthread_cond_destroy(&self->batchDone);
    engineFree((EngineBase *)self);
}

PyDoc_STRVAR(pollCounters_doc,
"pollCounters() -> (polls, caught, preempted)\n\n"
"The thread's busy-poll: the polls begun after a batch of\n"
"request/response traffic, those of them that caught an event before the\n"
"ceiling ran out, and those during which the thread was preempted (each ends polling for\n"
"a while).");

static PyObject *
UDPEngine_pollCounters(UDPEngine *self, PyObject *unused)
{
    return pollCounters(&self->poll, 1, sizeof self->poll);
}

static PyMethodDef UDPEngine_methods[] = {
    {"addListener", (PyCFunction)UDPEngine_addListener, METH_VARARGS, addListener_doc},
    {"removeListener", (PyCFunction)UDPEngine_removeListener, METH_O, removeListener_doc},
    {"adopt", (PyCFunction)UDPEngine_adopt, METH_VARARGS, adopt_doc},
    {"dropPending", (PyCFunction)UDPEngine_dropPending, METH_O, dropPending_doc},
    {"firstPending", (PyCFunction)UDPEngine_firstPending, METH_O, firstPending_doc},
    {"close", (PyCFunction)UDPEngine_close, METH_O, close_doc},
    {"counters", (PyCFunction)UDPEngine_counters, METH_O, counters_doc},
    {"listenerCounters", (PyCFunction)UDPEngine_listenerCounters, METH_O, listenerCounters_doc},
    {"reports", (PyCFunction)UDPEngine_reports, METH_NOARGS, reports_doc},
    {"gsoSends", (PyCFunction)UDPEngine_gsoSends, METH_NOARGS, gsoSends_doc},
    {"pollCounters", (PyCFunction)UDPEngine_pollCounters, METH_NOARGS, pollCounters_doc},
    {"stop", (PyCFunction)UDPEngine_stop, METH_NOARGS, stop_doc},
    ENGINE_COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(UDPEngine_doc,
"UDPEngine(gso=True, busyPoll=50)\n\n"
"A thread that forwards the datagrams of established UDP sessions for\n"
"every listener handed to it; its thread starts with the first listener.\n"
"gso: send consecutive datagrams of a session that have one size in one\n"
"system call with UDP GSO, where the kernel has it (Linux >= 4.18).\n"
"busyPoll: how long, in microseconds, the thread polls before it sleeps after\n"
"a small batch of request/response traffic (0: never poll).");

static PyTypeObject UDPEngineType =
    ENGINE_TYPE(UDPEngine, "twistedproxy.udp._engine.UDPEngine", UDPEngine_doc);

static struct PyModuleDef engineModuleDefinition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedproxy.udp._engine",
    .m_doc = "The compiled engine for established UDP sessions (Linux).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__engine(void)
{
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) == (ssize_t)sizeof seed)
        hashSeed ^= seed | 1;
    PyObject *m = engineModule(&engineModuleDefinition, &UDPEngineType, "UDPEngine");
    if (m == NULL)
        return NULL;
    PyModule_AddIntConstant(m, "DRAIN", DRAIN);
    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM);
    PyModule_AddIntConstant(m, "PENDING_CLIENTS", PENDING_CLIENTS);
    PyModule_AddIntConstant(m, "PENDING_DATAGRAMS", PENDING_DATAGRAMS);
    PyModule_AddIntConstant(m, "PENDING_BYTES", PENDING_BYTES);
    PyModule_AddIntConstant(m, "DEFAULT_BUSY_POLL_US", POLL_DEFAULT_CEILING_US);
    return m;
}
