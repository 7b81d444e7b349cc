/*
 * twistedproxy.tcp._engine: the compiled relay engine for established TCP
 * connections (Linux only: epoll, splice, eventfd), on the skeleton both
 * engines share (../_engine.h: descriptors, thread start, id table,
 * report queue, locking rule, vocabulary).
 *
 * Twisted accepts the client, connects to the target and then hands both
 * connected sockets to a TCPEngine (adopt).  The engine owns one background thread
 * with its own epoll instance; that thread never touches a Python object
 * and never takes the GIL.  It relays each flow both ways with splice(2)
 * through a pipe per direction (zero copy), or through a small userspace
 * buffer where a pipe cannot be had, and reports ended flows back to the
 * reactor thread through an eventfd.
 *
 * Threads and what they share:
 *
 *   - the reactor thread calls the Python methods below; the engine thread
 *     runs engineMain().  They share the id table (flowId -> Flow), the
 *     command queue and the report queue, all under one mutex that either
 *     thread holds only for a few instructions; neither holds it during a
 *     system call on a socket or while it builds Python objects.
 *   - per-flow byte counters are written by the engine thread alone with
 *     relaxed atomic stores and read by the reactor thread with relaxed
 *     atomic loads (plain aligned 64-bit moves on x86_64 and aarch64), so a
 *     read is never torn; it may lag the engine by one splice.
 *   - a Flow is freed only by the engine thread, after it has left the
 *     table under the mutex, so a reader holding the mutex never sees a
 *     freed Flow.
 *
 * Relay, per direction (client->target "in", target->client "out"):
 *
 *   source socket --splice--> pipe --splice--> destination socket
 *
 * epoll is edge-triggered; each socket is registered once for
 * IN|OUT|RDHUP and the engine keeps a "readable" and a "writable" flag per
 * socket, set by events and cleared only on EAGAIN.  A direction reads its
 * source only while its pipe has room, so a destination that does not read
 * leaves the data in the source socket's receive queue and TCP flow
 * control reaches the sender: per connection the engine holds at most one
 * pipe (or buffer) per direction, whatever the peers do.
 *
 * Pipes are created on a direction's first data and released by the
 * periodic sweep once empty and quiet for a sweep period, so an idle
 * connection costs one Flow (a couple of hundred bytes) and its two
 * sockets, no pipe.  Up to PIPE_POOL empty pipes are kept for the next
 * flows, so short connections do not pay pipe2() and F_SETPIPE_SZ each;
 * the sweep closes those unused for a sweep period.
 *
 * After a small batch in which a flow turned direction (an answer to a
 * request), the thread polls epoll for up to busyPoll microseconds
 * before it sleeps (the busy-poll of ../_engine.h, off for a while after
 * the thread was preempted during one): the next turn usually comes
 * sooner than a sleeping thread wakes.  One-way streams never turn, so
 * bulk traffic never polls.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

/* Default pipe size asked of F_SETPIPE_SZ (see bench/fastrelay_micro.py). */
#define DEFAULT_PIPE_SIZE (1024 * 1024)
/* Default userspace buffer size of a direction that has no pipe. */
#define DEFAULT_BUFFER_SIZE (64 * 1024)
/* Default ceiling of the busy-poll after small traffic,
 * microseconds (0: sleep at once); see ../_engine.h and docs/fastrelay.md. */
#define DEFAULT_BUSY_POLL_US POLL_DEFAULT_CEILING_US
/* The idle and pipe-release sweep runs this often (milliseconds). */
#define SWEEP_MS 500
#define MAX_EVENTS 256
/* Empty pipes kept for reuse by the next flows (two descriptors each). */
#define PIPE_POOL 32
/* Relay threads: at most this many by default (one per CPU the process may
 * use, see engineDefaultThreads and docs/fastrelay.md), never more than
 * MAX_THREADS. */
#define DEFAULT_MAX_THREADS ENGINE_DEFAULT_MAX_THREADS
#define MAX_THREADS ENGINE_MAX_THREADS

enum { CLIENT = 0, TARGET = 1 };
enum { MODE_NONE = 0, MODE_PIPE = 1, MODE_BUFFER = 2 };
enum { CMD_ADOPT = 1, CMD_CLOSE = 2 };

typedef struct Direction {
    uint64_t bytes;      /* relaxed-atomic counter, engine writes, readers load */
    char *buf;           /* MODE_BUFFER: the bytes in flight */
    uint32_t start, end; /* MODE_BUFFER: buf[start:end] is pending */
    uint32_t pending;    /* MODE_PIPE: bytes in the pipe */
    uint32_t capacity;   /* MODE_PIPE: the pipe's size */
    int pipeRead, pipeWrite;
    uint8_t mode;
    uint8_t eof;         /* the source sent its FIN */
    uint8_t shut;        /* shutdown(destination, SHUT_WR) done */
    uint8_t spliceFails; /* splice refused (EINVAL): use the buffer */
    uint8_t stash;       /* MODE_BUFFER holding what a direct send left over */
} Direction;

typedef struct Flow {
    IdEntry entry;                   /* id and chain in the id table */
    struct Flow *prev, *next;        /* engine thread's list of live flows */
    double idleTimeout;              /* seconds; 0 = never */
    double lastActive;               /* engine clock of the last byte read */
    int fd[2];                       /* CLIENT, TARGET */
    uint8_t readable[2], writable[2];
    uint8_t hup[2];                  /* the side reported its FIN, a hang-up or an error */
    uint8_t dead;
    uint8_t registered;              /* in the engine's epoll set */
    uint8_t exclusive;               /* no other descriptor shares the sockets */
    uint8_t lastRead;                /* direction of the last bytes read, 2: none yet */
    uint32_t pollStamp;              /* the busy-poll's window it was last counted in */
    const char *finishedFirst;       /* "client closed" / "target closed" */
    Direction dir[2];                /* 0: client->target, 1: target->client */
    /* What its access line needs (dial's access, clients and started),
     * owned references taken and dropped under the GIL only: the relay
     * thread moves the pointers into the flow's Report, untouched. */
    PyObject *access;                /* (tag, listener, head, arrow), or NULL */
    PyObject *client;                /* the client's host:port */
    double started;                  /* the caller's clock */
} Flow;

typedef struct Command {
    struct Command *next;
    int kind;
    uint64_t id;
    Flow *flow;
} Command;

typedef struct PooledPipe {
    int pipeRead, pipeWrite;
    uint32_t capacity;
    double pooledAt;  /* engine clock when it was given back */
} PooledPipe;

/* What the reactor learns of a flow that ended. */
typedef struct Report {
    uint64_t id, bytesIn, bytesOut;
    const char *reason;
    PyObject *access, *client;       /* the flow's, owned; NULL: none */
    double started;
} Report;

typedef struct TCPEngine TCPEngine;

/*
 * One relay thread and what it alone owns: its epoll instance and wake
 * eventfd, the flows workerOf gives it, their pipes, its pipe
 * pool and scratch buffer.  Worker 0 uses the engine's own epfd and
 * wakeFd (ENGINE_HEAD); the others open theirs.
 */
typedef struct Worker {
    EngineWorker base;    /* epfd, wakeFd, started, thread (_engine.h) */
    /* set at construction, read-only afterwards */
    TCPEngine *engine;
    /* shared, under the engine's lock */
    Command *commandHead, *commandTail;
    size_t flowCount;     /* live flows it owns (adopted, not yet ended) */
    /* this worker's thread only */
    Flow *live;
    Flow *graveyard;  /* ended in this batch; freed after it */
    double now;
    double nextSweep;
    uint64_t batchBytes;  /* moved in the current event batch */
    int batchTurns;       /* a flow in this batch turned direction */
    PooledPipe pool[PIPE_POOL];
    int poolCount;
    char *scratch;        /* bufferSize bytes: a direction's first bytes pass here */
    int reportedSinceWake;
    AdaptivePoll poll;    /* its busy-poll after request/response batches */
} Worker;

struct TCPEngine {
    ENGINE_HEAD
    /* set at construction, read-only afterwards */
    uint32_t pipeSize;
    uint32_t bufferSize;
    int workerCount;
    Worker *workers;
    int pollGate;    /* the workers' AdaptivePoll gate: one polls at a time */
};

/* The worker that owns flow id for its whole life: the id modulo the
 * number of threads.  Python's ids are consecutive over the process, so
 * connections opened one after another go round the threads, and N
 * streams opened together land one per thread, where a hash would leave
 * about a third of N threads idle (N balls in N bins). */
static Worker *
workerOf(TCPEngine *e, uint64_t id)
{
    return &e->workers[id % (uint64_t)e->workerCount];
}


/* -- the id table (caller holds the lock) --------------------------------- */

static Flow *
tableFind(TCPEngine *e, uint64_t id)
{
    IdEntry *entry = idTableFind(&e->flows, id);
    return entry == NULL ? NULL : ENTRY_OF(entry, Flow, entry);
}

/* -- per-direction resources ---------------------------------------------- */

/*
 * Give back a direction's pipe or buffer.  An empty pipe goes to the
 * engine's small pool, so that short connections do not pay pipe2 and
 * F_SETPIPE_SZ each; a pipe with bytes left in it (a flow cut short) is
 * closed.
 */
static void
releaseChannel(Worker *w, Direction *d)
{
    if (d->pipeRead >= 0) {
        if (d->pending == 0 && w->poolCount < PIPE_POOL) {
            PooledPipe *p = &w->pool[w->poolCount++];
            p->pipeRead = d->pipeRead;
            p->pipeWrite = d->pipeWrite;
            p->capacity = d->capacity;
            p->pooledAt = w->now;
        } else {
            close(d->pipeRead);
            close(d->pipeWrite);
        }
        d->pipeRead = d->pipeWrite = -1;
    }
    free(d->buf);
    d->buf = NULL;
    d->start = d->end = d->pending = 0;
    d->mode = MODE_NONE;
    d->stash = 0;
}

/*
 * Give a direction somewhere to hold bytes: a pipe, or when pipes are
 * refused (EMFILE, ENFILE, ENOMEM, or an engine built with pipeSize 0, or a
 * socket splice does not support) a malloc'd buffer.  0 on success, -1 when
 * not even the buffer could be had (the flow then ends).
 */
static int
openChannel(Worker *w, Direction *d)
{
    if (w->engine->pipeSize > 0 && !d->spliceFails) {
        if (w->poolCount > 0) {
            PooledPipe *p = &w->pool[--w->poolCount];
            d->pipeRead = p->pipeRead;
            d->pipeWrite = p->pipeWrite;
            d->capacity = p->capacity;
            d->pending = 0;
            d->mode = MODE_PIPE;
            return 0;
        }
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0) {
            /* Refused (EPERM: an unprivileged user over
             * /proc/sys/fs/pipe-user-pages-soft), the pipe keeps its size. */
            int size = fcntl(p[1], F_SETPIPE_SZ, (int)w->engine->pipeSize);
            if (size < 0)
                size = fcntl(p[1], F_GETPIPE_SZ);
            if (size <= 0)
                size = 4096;
            d->pipeRead = p[0];
            d->pipeWrite = p[1];
            d->capacity = (uint32_t)size;
            d->pending = 0;
            d->mode = MODE_PIPE;
            return 0;
        }
    }
    d->buf = malloc(w->engine->bufferSize);
    if (d->buf == NULL)
        return -1;
    d->start = d->end = 0;
    d->mode = MODE_BUFFER;
    return 0;
}

/* -- ending flows (engine thread) ----------------------------------------- */

static void
resetOnClose(int fd)
{
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

static void
postReport(Worker *w, Flow *f, const char *reason)
{
    /* caller holds the lock; adopt reserved this flow's slot.  The flow's
     * references go to the report as they are (no reference counting
     * outside the GIL). */
    Report *r = reportPost(&w->engine->reports);
    r->id = f->entry.id;
    r->bytesIn = f->dir[0].bytes;
    r->bytesOut = f->dir[1].bytes;
    r->reason = reason;
    r->access = f->access;
    r->client = f->client;
    r->started = f->started;
    f->access = f->client = NULL;
}

/* Drop the references of count reports that Python has seen (GIL held). */
static void
dropAccess(const Report *reports, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        Py_XDECREF(reports[i].access);
        Py_XDECREF(reports[i].client);
    }
}

/*
 * End a flow: close both sockets (with a reset on the sides named by
 * resetMask: bit CLIENT, bit TARGET), release its pipes, take it out of
 * the table, queue its report.  The Flow itself is freed after the current
 * event batch, whose later events may still point at it.
 */
static void
endFlow(Worker *w, Flow *f, const char *reason, int resetMask)
{
    if (f->dead)
        return;
    f->dead = 1;
    for (int s = 0; s < 2; s++) {
        /* close() takes a socket out of the epoll set when it was the
         * last descriptor of it; otherwise the set would go on reporting
         * events of a freed Flow. */
        if (f->registered && !f->exclusive)
            epoll_ctl(w->base.epfd, EPOLL_CTL_DEL, f->fd[s], NULL);
        if (resetMask & (1 << s))
            resetOnClose(f->fd[s]);
        close(f->fd[s]);
        f->fd[s] = -1;
        releaseChannel(w, &f->dir[s]);
    }
    pthread_mutex_lock(&w->engine->lock);
    idTableRemove(&w->engine->flows, &f->entry);
    w->flowCount--;
    postReport(w, f, reason);
    pthread_mutex_unlock(&w->engine->lock);
    w->reportedSinceWake = 1;
    if (f->prev != NULL)
        f->prev->next = f->next;
    else if (w->live == f)
        w->live = f->next;
    if (f->next != NULL)
        f->next->prev = f->prev;
    f->prev = NULL;
    f->next = w->graveyard;
    w->graveyard = f;
}

static const char *
resetBy(int side)
{
    return side == CLIENT ? "reset by client" : "reset by target";
}

/* -- the relay (engine thread) -------------------------------------------- */

/* Account for n bytes read in direction d of flow f. */
static void
noteRead(Worker *w, Flow *f, int d, ssize_t n)
{
    Direction *dir = &f->dir[d];
    __atomic_store_n(&dir->bytes, dir->bytes + (uint64_t)n, __ATOMIC_RELAXED);
    f->lastActive = w->now;
    pollSawFlow(&w->poll, &f->pollStamp);
    if (f->lastRead != d) {
        /* An answer to what went the other way: this flow is
         * request/response traffic. */
        if (f->lastRead != 2)
            w->batchTurns = 1;
        f->lastRead = (uint8_t)d;
    }
}

static void
noteEof(Flow *f, int src)
{
    f->dir[src == CLIENT ? 0 : 1].eof = 1;
    if (f->finishedFirst == NULL)
        f->finishedFirst = src == CLIENT ? "client closed" : "target closed";
}

/*
 * Direction d of flow f holds no channel and its destination is writable:
 * read what the source has into the engine's scratch buffer and send it
 * straight on.  A short message (a request, an answer) then costs one
 * recv and one send, and no pipe.  What the destination does not take at
 * once is stashed in a buffer (the direction reads no more until it has
 * gone); a read that fills the scratch buffer means a stream has begun,
 * and the direction takes a channel, so that the rest is spliced.
 * Returns -1 if the flow ended, 1 if bytes were read, 0 if not (the source
 * had nothing, or its end).
 */
static int
relayDirect(Worker *w, Flow *f, int d)
{
    Direction *dir = &f->dir[d];
    int src = d == 0 ? CLIENT : TARGET;
    int dst = 1 - src;
    ssize_t n = recv(f->fd[src], w->scratch, w->engine->bufferSize, MSG_DONTWAIT);
    if (n == 0) {
        noteEof(f, src);
        return 0;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            f->readable[src] = 0;
            return 0;
        }
        if (errno == EINTR)
            return 0;
        endFlow(w, f, resetBy(src), 1 << dst);
        return -1;
    }
    noteRead(w, f, d, n);
    ssize_t sent = send(f->fd[dst], w->scratch, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            f->writable[dst] = 0;
        } else if (errno != EINTR) {
            endFlow(w, f, resetBy(dst), 1 << src);
            return -1;
        }
        sent = 0;
    }
    w->batchBytes += (uint64_t)sent;
    size_t rest = (size_t)(n - sent);
    if (rest == 0 && (size_t)n < w->engine->bufferSize) {
        /* A short read emptied the socket: with edge-triggered epoll, the
         * next bytes come with a new event.  A FIN or an error reported
         * by the event that woke the thread gives no new one, so then the
         * source is read on until it says so. */
        if (!f->hup[src])
            f->readable[src] = 0;
        return 1;
    }
    if (rest > 0) {
        dir->buf = malloc(w->engine->bufferSize);
        if (dir->buf == NULL) {
            endFlow(w, f, "out of memory", 3);
            return -1;
        }
        memcpy(dir->buf, w->scratch + sent, rest);
        dir->start = 0;
        dir->end = (uint32_t)rest;
        dir->mode = MODE_BUFFER;
        dir->stash = 1;
    } else if (openChannel(w, dir) < 0) {
        endFlow(w, f, "out of memory", 3);
        return -1;
    }
    return 1;
}

/*
 * Move what can be moved in direction d of flow f without blocking.
 * Returns 1 if bytes moved, 0 if nothing could, -1 if the flow ended.
 */
static int
pumpDirection(Worker *w, Flow *f, int d)
{
    Direction *dir = &f->dir[d];
    int src = d == 0 ? CLIENT : TARGET;
    int dst = 1 - src;
    int moved = 0;
    int full = 0; /* the pipe refused more (EAGAIN with bytes in it) */

    for (;;) {
        int progress = 0;

        /* drain: channel -> destination */
        if (dir->mode == MODE_PIPE && dir->pending > 0 && f->writable[dst]) {
            ssize_t n = splice(dir->pipeRead, NULL, f->fd[dst], NULL,
                               dir->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                dir->pending -= (uint32_t)n;
                w->batchBytes += (uint64_t)n;
                progress = 1;
                full = 0;
            } else if (n < 0 && errno == EAGAIN) {
                f->writable[dst] = 0;
            } else if (n < 0 && errno != EINTR) {
                endFlow(w, f, resetBy(dst), 1 << src);
                return -1;
            }
        } else if (dir->mode == MODE_BUFFER && dir->end > dir->start && f->writable[dst]) {
            ssize_t n = send(f->fd[dst], dir->buf + dir->start, dir->end - dir->start,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                dir->start += (uint32_t)n;
                w->batchBytes += (uint64_t)n;
                if (dir->start == dir->end) {
                    dir->start = dir->end = 0;
                    /* A stash has gone: back to direct sends. */
                    if (dir->stash)
                        releaseChannel(w, dir);
                }
                progress = 1;
            } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                f->writable[dst] = 0;
            } else if (n < 0 && errno != EINTR) {
                endFlow(w, f, resetBy(dst), 1 << src);
                return -1;
            }
        }

        /* fill: source -> channel, only while there is room */
        if (!dir->eof && f->readable[src] && !full) {
            if (dir->mode == MODE_NONE && f->writable[dst]) {
                int r = relayDirect(w, f, d);
                if (r < 0)
                    return -1;
                if (r == 0)
                    continue;
                moved = 1;
                continue;
            }
            if (dir->mode == MODE_NONE) {
                /* A pipe only for a direction that has something to carry:
                 * an idle flow (or one just adopted) holds none. */
                char probe;
                ssize_t p = recv(f->fd[src], &probe, 1, MSG_PEEK | MSG_DONTWAIT);
                if (p == 0) {
                    noteEof(f, src);
                    continue;
                }
                if (p < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        f->readable[src] = 0;
                        continue;
                    }
                    if (errno == EINTR)
                        continue;
                    endFlow(w, f, resetBy(src), 1 << dst);
                    return -1;
                }
                if (openChannel(w, dir) < 0) {
                    endFlow(w, f, "out of memory", 3);
                    return -1;
                }
            }
            ssize_t n = -1;
            int room = 0;
            if (dir->mode == MODE_PIPE && dir->pending < dir->capacity) {
                room = 1;
                n = splice(f->fd[src], NULL, dir->pipeWrite, NULL,
                           dir->capacity - dir->pending,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                if (n > 0)
                    dir->pending += (uint32_t)n;
                else if (n < 0 && errno == EINVAL && dir->pending == 0) {
                    /* This socket cannot be spliced: a buffer from now on. */
                    dir->spliceFails = 1;
                    releaseChannel(w, dir);
                    if (openChannel(w, dir) < 0) {
                        endFlow(w, f, "out of memory", 3);
                        return -1;
                    }
                    continue;
                }
            } else if (dir->mode == MODE_BUFFER && !dir->stash && dir->end < w->engine->bufferSize) {
                room = 1;
                n = recv(f->fd[src], dir->buf + dir->end, w->engine->bufferSize - dir->end,
                         MSG_DONTWAIT);
                if (n > 0)
                    dir->end += (uint32_t)n;
            }
            if (room) {
                if (n > 0) {
                    noteRead(w, f, d, n);
                    progress = 1;
                } else if (n == 0) {
                    noteEof(f, src);
                } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    /*
                     * With bytes in the pipe, EAGAIN may mean the pipe ran
                     * out of slots rather than the socket out of data: keep
                     * the readable flag and retry once the pipe drains.
                     * An empty pipe cannot be full, so then it was the
                     * socket.
                     */
                    if (dir->mode == MODE_PIPE && dir->pending > 0)
                        full = 1;
                    else
                        f->readable[src] = 0;
                } else if (errno != EINTR) {
                    endFlow(w, f, resetBy(src), 1 << dst);
                    return -1;
                }
            }
        }

        if (!progress)
            break;
        moved = 1;
    }

    /* half-close: the source finished and everything it sent went out */
    if (dir->eof && !dir->shut) {
        int empty = dir->mode == MODE_PIPE ? dir->pending == 0
                  : dir->mode == MODE_BUFFER ? dir->end == dir->start : 1;
        if (empty) {
            dir->shut = 1;
            releaseChannel(w, dir);
            if (f->dir[1 - d].shut) {
                /* Both ways done: close() sends the last FIN, as the
                 * destination has nothing unread left. */
                endFlow(w, f, f->finishedFirst, 0);
                return -1;
            }
            /* ENOTCONN after a reset shows up as an error on the next
             * read or write of that socket. */
            shutdown(f->fd[dst], SHUT_WR);
        }
    }
    return moved;
}

static void
pumpFlow(Worker *w, Flow *f)
{
    /* Each direction can unblock the other only through the peers, which
     * shows up as a new event: one pass of each suffices. */
    if (pumpDirection(w, f, 0) < 0)
        return;
    pumpDirection(w, f, 1);
}

static int
socketFailed(int fd)
{
    int error = 0;
    socklen_t len = sizeof(error);
    return getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error != 0;
}

/* -- commands and the sweep (engine thread) ------------------------------- */

static void
startFlow(Worker *w, Flow *f)
{
    struct epoll_event ev;
    for (int s = 0; s < 2; s++) {
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.u64 = (uint64_t)(uintptr_t)f | (uint64_t)s;
        if (epoll_ctl(w->base.epfd, EPOLL_CTL_ADD, f->fd[s], &ev) < 0) {
            if (s == 1)
                epoll_ctl(w->base.epfd, EPOLL_CTL_DEL, f->fd[0], NULL);
            f->registered = 0;
            endFlow(w, f, "engine could not watch the sockets", 3);
            return;
        }
    }
    f->registered = 1;
    f->lastActive = w->now;
    f->next = w->live;
    if (w->live != NULL)
        w->live->prev = f;
    w->live = f;
    /* Edge-triggered: bytes that arrived before the registration gave no
     * edge, so start as if both sockets were ready. */
    f->readable[0] = f->readable[1] = 1;
    f->writable[0] = f->writable[1] = 1;
    pumpFlow(w, f);
}

/* Run this worker's queued commands; returns 1 when the engine must stop
 * (stop() sets the engine's stopping flag, then wakes every worker). */
static int
runCommands(Worker *w)
{
    drainFd(w->base.wakeFd);
    pthread_mutex_lock(&w->engine->lock);
    Command *c = w->commandHead;
    w->commandHead = w->commandTail = NULL;
    int stop = w->engine->stopping;
    pthread_mutex_unlock(&w->engine->lock);
    while (c != NULL) {
        Command *next = c->next;
        if (c->kind == CMD_ADOPT) {
            startFlow(w, c->flow);
        } else if (c->kind == CMD_CLOSE) {
            pthread_mutex_lock(&w->engine->lock);
            Flow *f = tableFind(w->engine, c->id);
            pthread_mutex_unlock(&w->engine->lock);
            /* Only this thread removes flows, so f stays valid. */
            if (f != NULL)
                endFlow(w, f, "killed", 3);
        }
        free(c);
        c = next;
    }
    return stop;
}

static void
sweep(Worker *w)
{
    /* Pooled pipes unused for a sweep period are closed: the pool serves
     * bursts of short connections, and a quiet proxy keeps no spare
     * descriptors.  The oldest are at the bottom of the stack. */
    int kept = 0;
    for (int i = 0; i < w->poolCount; i++) {
        PooledPipe *p = &w->pool[i];
        if ((w->now - p->pooledAt) * 1000.0 >= SWEEP_MS) {
            close(p->pipeRead);
            close(p->pipeWrite);
        } else {
            w->pool[kept++] = *p;
        }
    }
    w->poolCount = kept;

    Flow *f = w->live;
    while (f != NULL) {
        Flow *next = f->next;
        double quiet = w->now - f->lastActive;
        if (f->idleTimeout > 0 && quiet >= f->idleTimeout) {
            endFlow(w, f, "idle timeout", 3);
        } else if (quiet * 1000.0 >= SWEEP_MS) {
            /* Quiet for a whole sweep period: give back empty pipes and
             * buffers; the next byte opens a fresh one. */
            for (int d = 0; d < 2; d++) {
                Direction *dir = &f->dir[d];
                if ((dir->mode == MODE_PIPE && dir->pending == 0) ||
                    (dir->mode == MODE_BUFFER && dir->end == dir->start))
                    releaseChannel(w, dir);
            }
        }
        f = next;
    }
}

static void
buryDead(Worker *w)
{
    Flow *f = w->graveyard;
    w->graveyard = NULL;
    while (f != NULL) {
        Flow *next = f->next;
        free(f);
        f = next;
    }
}

static void *
engineMain(void *arg)
{
    Worker *w = (Worker *)arg;
    struct epoll_event events[MAX_EVENTS];
    int stop = 0;
    /* "tcprelay0", "tcprelay1", ...: what top -H and /proc/PID/task show. */
    char name[16];
    snprintf(name, sizeof name, "tcprelay%d", (int)(w - w->engine->workers));
    pthread_setname_np(pthread_self(), name);
    int eligible = 0;
    w->now = engineCoarseNow();
    w->nextSweep = w->now + SWEEP_MS / 1000.0;
    while (!stop) {
        int timeout = (int)((w->nextSweep - w->now) * 1000.0) + 1;
        if (timeout < 0)
            timeout = 0;
        int n = pollWait(&w->poll, w->base.epfd, events, MAX_EVENTS, timeout, eligible);
        w->now = engineCoarseNow();
        pollBatch(&w->poll, (int64_t)(w->now * 1000.0));
        w->batchBytes = 0;
        w->batchTurns = 0;
        for (int i = 0; i < n; i++) {
            uint64_t data = events[i].data.u64;
            if (data == 0) {
                stop = runCommands(w);
                continue;
            }
            Flow *f = (Flow *)(uintptr_t)(data & ~(uint64_t)1);
            int side = (int)(data & 1);
            if (f->dead)
                continue;
            uint32_t ev = events[i].events;
            if ((ev & EPOLLERR) && f->dir[side == CLIENT ? 0 : 1].eof &&
                socketFailed(f->fd[side])) {
                /* A reset on a side that has finished sending: no read
                 * would ever see it, and nothing can be written to it. */
                endFlow(w, f, resetBy(side), 1 << (1 - side));
                continue;
            }
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                f->readable[side] = 1;
            if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                f->hup[side] = 1;
            if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                f->writable[side] = 1;
            pumpFlow(w, f);
        }
        /* Poll (the busy-poll of ../_engine.h) only after a
         * small batch in which a flow turned direction (request/response
         * traffic, whose next turn is likely microseconds away).  A
         * one-way stream never turns: the thread sleeps between its
         * batches and leaves the CPU to the peers that produce and
         * consume it, even when a starved sender makes its batches small. */
        eligible = n > 0 && w->batchTurns && w->batchBytes < POLL_MAX_BATCH &&
                   pollFewFlows(&w->poll);
        if (w->now >= w->nextSweep) {
            sweep(w);
            w->nextSweep = w->now + SWEEP_MS / 1000.0;
        }
        buryDead(w);
        if (w->reportedSinceWake) {
            w->reportedSinceWake = 0;
            signalFd(w->engine->notifyFd);
        }
    }
    /* Stopping: every flow still open ends with a reset on both sides, so
     * no peer takes the cut for a complete stream. */
    while (w->live != NULL)
        endFlow(w, w->live, "proxy stopped", 3);
    /* Adopts queued in the batch that saw the stop never started. */
    pthread_mutex_lock(&w->engine->lock);
    Command *c = w->commandHead;
    w->commandHead = w->commandTail = NULL;
    pthread_mutex_unlock(&w->engine->lock);
    while (c != NULL) {
        Command *next = c->next;
        if (c->kind == CMD_ADOPT)
            endFlow(w, c->flow, "proxy stopped", 3);
        free(c);
        c = next;
    }
    buryDead(w);
    while (w->poolCount > 0) {
        PooledPipe *p = &w->pool[--w->poolCount];
        close(p->pipeRead);
        close(p->pipeWrite);
    }
    signalFd(w->engine->notifyFd);
    return NULL;
}

/* -- the Python type ------------------------------------------------------ */

static int
queueCommand(Worker *w, int kind, uint64_t id, Flow *f)
{
    /* caller holds the lock */
    Command *c = malloc(sizeof(Command));
    if (c == NULL)
        return -1;
    c->next = NULL;
    c->kind = kind;
    c->id = id;
    c->flow = f;
    if (w->commandTail != NULL)
        w->commandTail->next = c;
    else
        w->commandHead = c;
    w->commandTail = c;
    return 0;
}

static int
TCPEngine_init(TCPEngine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pipeSize", "bufferSize", "busyPoll", "threads", NULL};
    long pipeSize = DEFAULT_PIPE_SIZE;
    long bufferSize = DEFAULT_BUFFER_SIZE;
    long busyPoll = DEFAULT_BUSY_POLL_US;
    long threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|llll:TCPEngine", kwlist,
                                     &pipeSize, &bufferSize, &busyPoll, &threads))
        return -1;
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "TCPEngine already initialised");
        return -1;
    }
    if (busyPoll < 0 || busyPoll > 1000000) {
        PyErr_SetString(PyExc_ValueError, "busyPoll must be between 0 and 1000000 microseconds");
        return -1;
    }
    if (pipeSize < 0 || pipeSize > (1L << 30)) {
        PyErr_SetString(PyExc_ValueError, "pipeSize must be 0 (no pipes) or up to 1 GiB");
        return -1;
    }
    if (bufferSize < 4096 || bufferSize > (1L << 30)) {
        PyErr_SetString(PyExc_ValueError, "bufferSize must be between 4 KiB and 1 GiB");
        return -1;
    }
    int count = engineThreadCount(threads);
    if (count < 0)
        return -1;
    self->pipeSize = (uint32_t)pipeSize;
    self->bufferSize = (uint32_t)bufferSize;
    /* Events of the wake eventfds carry 0; a flow's, its Flow. */
    epoll_data_t wakeData = {.u64 = 0};
    if (engineOpen((EngineBase *)self, wakeData, 1024, sizeof(Report)) < 0)
        return -1;
    if (engineOpenWorkers((EngineBase *)self, (void **)&self->workers, sizeof(Worker), count,
                          &self->workerCount, wakeData) < 0)
        return -1;
    for (int i = 0; i < count; i++) {
        Worker *w = &self->workers[i];
        w->engine = self;
        pollInit(&w->poll, busyPoll, &self->pollGate);
        w->scratch = malloc(self->bufferSize);
        if (w->scratch == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void
TCPEngine_dealloc(TCPEngine *self)
{
    /* A started engine holds a reference to itself until stop() joins its
     * threads, so here they are either joined or were never started. */
    if (self->flows.buckets != NULL) {
        ID_TABLE_EACH(&self->flows, i, entry, next) {
            Flow *f = ENTRY_OF(entry, Flow, entry);
            /* adopted but never started: the engine owns the fds */
            close(f->fd[0]);
            close(f->fd[1]);
            Py_XDECREF(f->access);
            Py_XDECREF(f->client);
            free(f);
        }
    }
    for (int i = 0; i < self->workerCount; i++) {
        Worker *w = &self->workers[i];
        Command *c = w->commandHead;
        while (c != NULL) {
            Command *next = c->next;
            free(c);
            c = next;
        }
        free(w->scratch);
    }
    engineCloseWorkers(self->workers, sizeof(Worker), self->workerCount);
    if (self->reports.items != NULL)
        dropAccess((const Report *)self->reports.items, self->reports.count);
    engineFree((EngineBase *)self);
}

static int
checkReady(TCPEngine *self)
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "TCPEngine not initialised");
        return -1;
    }
    return 0;
}

static int
isStreamSocket(int fd)
{
    int type = 0;
    socklen_t len = sizeof(type);
    return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

static int
makeNonBlocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    if (flags & O_NONBLOCK)
        return 0;
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* Worker 0's thread is the engine's own (engineStartThread gives it the
 * engine). */
static void *
firstWorkerMain(void *engine)
{
    return engineMain(&((TCPEngine *)engine)->workers[0]);
}

/*
 * Start every relay thread not yet running: worker 0 as the skeleton's
 * engine thread (engineStartThread: the engine holds a reference to
 * itself until stop() joins it), the others through engineSpawn (signals
 * blocked and ENGINE_STACK_SIZE alike).  0, or -1 with OSError set (the
 * threads that did start keep running; the next adopt tries the rest).
 */
static int
startWorkers(TCPEngine *self)
{
    return engineStartWorkers((EngineBase *)self, self->workers, sizeof(Worker),
                              self->workerCount, firstWorkerMain, engineMain);
}

PyDoc_STRVAR(adopt_doc,
"adopt(clientFd, targetFd, flowId, idleTimeout, exclusive=False) -> None\n\n"
"Relay between two connected stream sockets until both directions end.\n"
"On success the engine owns both fds and closes them when the flow ends;\n"
"on an exception the caller still owns them.  flowId is a non-negative\n"
"integer unique among this engine's live flows; idleTimeout is in seconds,\n"
"0 for never.  exclusive: the caller vouches that both are non-blocking\n"
"stream sockets that no other descriptor refers to (as accept() and a\n"
"detached socket give), so the engine checks nothing and needs no\n"
"system call to take them.  Raises ValueError (bad fd, duplicate id),\n"
"RuntimeError (engine stopped) or OSError (the thread could not start).");

/* What adoptFlow made of an adopt. */
typedef enum { ADOPTED, STOPPED, DUPLICATE, NO_MEMORY } AdoptOutcome;

/*
 * Give the flow id (sockets clientFd and targetFd, already checked) to
 * its worker: the Flow, its table entry, its report slot and the
 * command that starts it.  On ADOPTED the engine owns both descriptors,
 * and *wake is set when the worker must be woken (signalFd of its wakeFd:
 * once after a batch of adopts will do); on any other outcome nothing
 * changed and the caller still owns them.  Reactor thread, GIL held.
 */
static AdoptOutcome
adoptFlow(TCPEngine *self, int clientFd, int targetFd, uint64_t id, double idleTimeout,
          int exclusive, PyObject *access, PyObject *client, double started, int *wake)
{
    Flow *f = calloc(1, sizeof(Flow));
    if (f == NULL)
        return NO_MEMORY;
    f->entry.id = id;
    f->fd[CLIENT] = clientFd;
    f->fd[TARGET] = targetFd;
    f->idleTimeout = idleTimeout;
    f->exclusive = (uint8_t)exclusive;
    f->lastRead = 2;
    if (access != NULL) {
        /* Set before the relay thread can see the flow; the references are
         * taken below, still under the GIL, once it is adopted. */
        f->access = access;
        f->client = client;
        f->started = started;
    }
    for (int d = 0; d < 2; d++)
        f->dir[d].pipeRead = f->dir[d].pipeWrite = -1;
    Worker *w = workerOf(self, id);

    AdoptOutcome outcome = ADOPTED;
    pthread_mutex_lock(&self->lock);
    /* The engine takes the whole queue after it read the eventfd: an
     * adopt queued behind another one needs no wake-up of its own. */
    int first = w->commandHead == NULL;
    if (self->stopping)
        outcome = STOPPED;
    else if (tableFind(self, id) != NULL)
        outcome = DUPLICATE;
    else if (reportReserve(&self->reports, 1) < 0)
        outcome = NO_MEMORY;
    else if (idTableInsert(&self->flows, &f->entry) < 0) {
        reportRelease(&self->reports);
        outcome = NO_MEMORY;
    } else if (queueCommand(w, CMD_ADOPT, id, f) < 0) {
        idTableRemove(&self->flows, &f->entry);
        reportRelease(&self->reports);
        outcome = NO_MEMORY;
    } else {
        w->flowCount++;
    }
    pthread_mutex_unlock(&self->lock);
    if (outcome != ADOPTED) {
        free(f);
        return outcome;
    }
    Py_XINCREF(access);
    Py_XINCREF(client);
    if (first)
        *wake = 1;
    return outcome;
}

static PyObject *
TCPEngine_adopt(TCPEngine *self, PyObject *args)
{
    int clientFd, targetFd;
    unsigned long long id;
    double idleTimeout;
    int exclusive = 0;
    if (!PyArg_ParseTuple(args, "iiKd|p:adopt", &clientFd, &targetFd, &id, &idleTimeout,
                          &exclusive))
        return NULL;
    if (checkReady(self) < 0)
        return NULL;
    if (clientFd < 0 || targetFd < 0 || clientFd == targetFd) {
        PyErr_SetString(PyExc_ValueError, "adopt needs two distinct open fds");
        return NULL;
    }
    if (!(idleTimeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "idleTimeout must be >= 0");
        return NULL;
    }
    if (!exclusive) {
        if (!isStreamSocket(clientFd) || !isStreamSocket(targetFd)) {
            PyErr_SetString(PyExc_ValueError, "adopt needs two stream sockets");
            return NULL;
        }
        if (makeNonBlocking(clientFd) < 0 || makeNonBlocking(targetFd) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* The threads start with the first flow, so a process that forks
     * (twistd daemonising) before any connection forks single-threaded. */
    if (startWorkers(self) < 0)
        return NULL;
    int wake = 0;
    AdoptOutcome outcome = adoptFlow(self, clientFd, targetFd, id, idleTimeout, exclusive,
                                     NULL, NULL, 0.0, &wake);
    if (outcome == STOPPED) {
        PyErr_SetString(PyExc_RuntimeError, "engine stopped");
        return NULL;
    }
    if (outcome == NO_MEMORY)
        return PyErr_NoMemory();
    if (outcome == DUPLICATE) {
        PyErr_Format(PyExc_ValueError, "duplicate flowId %llu", id);
        return NULL;
    }
    if (wake)
        signalFd(workerOf(self, id)->base.wakeFd);
    Py_RETURN_NONE;
}

/* -- dialing a batch of accepted clients ----------------------------------- */

/* TCP states (tcpi_state, the first byte of TCP_INFO). */
#define TCP_STATE_SYN_SENT 2
#define TCP_STATE_CLOSE 7

/* The target of dial(): an IP literal and a port as a socket address. */
static int
targetAddress(const char *host, int port, struct sockaddr_storage *address,
              socklen_t *length)
{
    memset(address, 0, sizeof *address);
    if (port < 0 || port > 65535)
        return -1;
    struct sockaddr_in *a4 = (struct sockaddr_in *)address;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)address;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *length = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *length = sizeof *a6;
        return 0;
    }
    return -1;
}

/* An OS error as the access line words it: strerror in lower case, as
 * Python's os.strerror(code).lower(), after prefix. */
static PyObject *
failureText(const char *prefix, int code)
{
    char text[160];
    int n = snprintf(text, sizeof text, "%s%s", prefix, strerror(code));
    if (n < 0)
        n = 0;
    for (size_t i = strlen(prefix); text[i] != '\0'; i++)
        if (text[i] >= 'A' && text[i] <= 'Z')
            text[i] = (char)(text[i] - 'A' + 'a');
    return PyUnicode_FromString(text);
}

/*
 * Connect a new non-blocking socket to address: its descriptor, with
 * *status 0 (connected: on loopback the handshake is done inside
 * connect()) or EINPROGRESS (the SYN is out, no answer yet); or -1 with
 * *status the errno of the failure.
 */
static int
connectTarget(const struct sockaddr_storage *address, socklen_t length, int *status)
{
    int fd = socket(address->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *status = errno;
        return -1;
    }
    int rc;
    do {
        rc = connect(fd, (const struct sockaddr *)address, length);
    } while (rc < 0 && errno == EINTR);
    *status = rc == 0 ? 0 : errno;
    if (*status == EINPROGRESS) {
        /* One byte of TCP_INFO is the connection's state: still sending
         * its SYN, failed (closed), or connected (established, or
         * already closed by the target, which the engine then relays). */
        unsigned char state = TCP_STATE_SYN_SENT;
        socklen_t size = 1;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &state, &size) == 0) {
            if (state == TCP_STATE_CLOSE) {
                int error = 0;
                socklen_t len = sizeof error;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len);
                *status = error ? error : ECONNREFUSED;
            } else if (state != TCP_STATE_SYN_SENT) {
                *status = 0;
            }
        }
    }
    if (*status != 0 && *status != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

PyDoc_STRVAR(dial_doc,
"dial(clientFds, flowIds, host, port, idleTimeout, headers=None) -> list\n\n"
"Connect to the target host (an IP literal) and port once for each client\n"
"of a batch (clientFds: accepted, non-blocking descriptors no other\n"
"descriptor refers to, as accept() gives; flowIds: the flow id of each),\n"
"and adopt (exclusive) each pair whose connect completed at once, after\n"
"sending it headers[i] (the PROXY header) when headers is given.  One\n"
"result per client: 0, the engine has the flow (both descriptors; its\n"
"report comes as adopt's); an int > 0, the target socket's descriptor,\n"
"now the caller's, whose non-blocking connect is under way; a str, why\n"
"the connect failed (as the access line words it after 'connect failed:\n"
"'), the target socket closed; None, the engine refused the flow\n"
"(stopped, out of memory, a bad descriptor or id), the target socket\n"
"closed.  The caller keeps\n"
"the client descriptor of every result but 0.  access, when given, is\n"
"(tag, listener, head, arrow), head and arrow str, with clients (one\n"
"str, host:port, per client) and started (the caller's clock): each\n"
"adopted flow keeps them, and finished() writes its access line with\n"
"them.  Relay threads start with\n"
"the first call, as with adopt().");

static PyObject *
TCPEngine_dial(TCPEngine *self, PyObject *args)
{
    PyObject *clientFds, *flowIds, *headers = Py_None, *access = Py_None, *clients = Py_None;
    const char *host;
    int port;
    double idleTimeout, started = 0.0;
    if (!PyArg_ParseTuple(args, "O!O!sid|OOOd:dial", &PyList_Type, &clientFds, &PyList_Type,
                          &flowIds, &host, &port, &idleTimeout, &headers, &access, &clients,
                          &started))
        return NULL;
    if (checkReady(self) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(clientFds);
    if (PyList_GET_SIZE(flowIds) != count ||
        (headers != Py_None && (!PyList_Check(headers) || PyList_GET_SIZE(headers) != count))) {
        PyErr_SetString(PyExc_ValueError, "dial needs one flow id (and header) per client");
        return NULL;
    }
    if (!(idleTimeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "idleTimeout must be >= 0");
        return NULL;
    }
    if (access == Py_None) {
        access = NULL;
    } else if (!PyTuple_Check(access) || PyTuple_GET_SIZE(access) != 4 ||
               !PyUnicode_Check(PyTuple_GET_ITEM(access, 2)) ||
               !PyUnicode_Check(PyTuple_GET_ITEM(access, 3)) || !PyList_Check(clients) ||
               PyList_GET_SIZE(clients) != count) {
        PyErr_SetString(PyExc_ValueError,
                        "dial's access is (tag, listener, head, arrow) with one client each");
        return NULL;
    } else {
        for (Py_ssize_t i = 0; i < count; i++)
            if (!PyUnicode_Check(PyList_GET_ITEM(clients, i))) {
                PyErr_SetString(PyExc_TypeError, "dial's clients are str");
                return NULL;
            }
    }
    struct sockaddr_storage address;
    socklen_t length;
    if (targetAddress(host, port, &address, &length) < 0) {
        PyErr_Format(PyExc_ValueError, "dial needs an IP address and a port, not %s:%d", host,
                     port);
        return NULL;
    }
    /* Every argument is read before a socket is opened: an error raised
     * after one would leave it nowhere. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *fd = PyList_GET_ITEM(clientFds, i);
        PyObject *id = PyList_GET_ITEM(flowIds, i);
        if (!PyLong_Check(fd) || !PyLong_Check(id) ||
            (headers != Py_None && !PyBytes_Check(PyList_GET_ITEM(headers, i)))) {
            PyErr_SetString(PyExc_TypeError,
                            "dial needs int descriptors, int flow ids and bytes headers");
            return NULL;
        }
    }
    if (startWorkers(self) < 0)
        return NULL;
    PyObject *results = PyList_New(count);
    if (results == NULL)
        return NULL;
    uint8_t wake[MAX_THREADS] = {0};
    for (Py_ssize_t i = 0; i < count; i++) {
        int clientFd = (int)PyLong_AsLong(PyList_GET_ITEM(clientFds, i));
        uint64_t id = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(flowIds, i));
        PyObject *result = NULL;
        if (PyErr_Occurred()) {
            /* Out of range: this client is not dialed. */
            PyErr_Clear();
            Py_INCREF(Py_None);
            PyList_SET_ITEM(results, i, Py_None);
            continue;
        }
        int status;
        int targetFd = connectTarget(&address, length, &status);
        if (targetFd < 0) {
            result = failureText("", status);
        } else if (status == EINPROGRESS) {
            result = PyLong_FromLong(targetFd);
            if (result == NULL) {
                close(targetFd);
                result = failureText("", ENOMEM);
            }
        } else {
            int one = 1;
            setsockopt(targetFd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            setsockopt(targetFd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
            if (headers != Py_None) {
                PyObject *header = PyList_GET_ITEM(headers, i);
                Py_ssize_t size = PyBytes_GET_SIZE(header);
                ssize_t sent = size == 0 ? 0
                    : send(targetFd, PyBytes_AS_STRING(header), (size_t)size,
                           MSG_NOSIGNAL | MSG_DONTWAIT);
                if (sent < 0)
                    result = failureText("cannot send the PROXY header: ", errno);
                else if (sent != size)
                    result = PyUnicode_FromFormat(
                        "cannot send the PROXY header: %zd of %zd bytes sent", sent, size);
            }
            if (result == NULL && !PyErr_Occurred()) {
                int wakeWorker = 0;
                AdoptOutcome outcome = adoptFlow(
                    self, clientFd, targetFd, id, idleTimeout, 1, access,
                    access != NULL ? PyList_GET_ITEM(clients, i) : NULL, started, &wakeWorker);
                if (outcome == ADOPTED) {
                    if (wakeWorker)
                        wake[id % (uint64_t)self->workerCount] = 1;
                    result = PyLong_FromLong(0);
                } else {
                    close(targetFd);
                    Py_INCREF(Py_None);
                    result = Py_None;
                }
            } else {
                close(targetFd);
            }
        }
        if (result == NULL) {
            /* Out of memory for the result: the target socket was closed
             * (or never opened) and None says so. */
            PyErr_Clear();
            Py_INCREF(Py_None);
            result = Py_None;
        }
        PyList_SET_ITEM(results, i, result);
    }
    for (int k = 0; k < self->workerCount; k++)
        if (wake[k])
            signalFd(self->workers[k].base.wakeFd);
    return results;
}

PyDoc_STRVAR(close_doc,
"close(flowId) -> bool\n\n"
"Ask the engine to end a flow now, resetting both sockets; its report\n"
"says 'killed'.  False when no such flow is live.");

static PyObject *
TCPEngine_close(TCPEngine *self, PyObject *arg)
{
    uint64_t id;
    if (parseFlowId(arg, &id) < 0)
        return NULL;
    if (checkReady(self) < 0)
        return NULL;
    int known = 0, queued = 0;
    Worker *w = workerOf(self, id);
    pthread_mutex_lock(&self->lock);
    if (!self->stopping && tableFind(self, id) != NULL) {
        known = 1;
        queued = queueCommand(w, CMD_CLOSE, id, NULL) == 0;
    }
    pthread_mutex_unlock(&self->lock);
    if (known && !queued)
        return PyErr_NoMemory();
    if (queued)
        signalFd(w->base.wakeFd);
    return PyBool_FromLong(known);
}

PyDoc_STRVAR(counters_doc,
"counters(flowId) -> (bytesIn, bytesOut) or None\n\n"
"Bytes read from the client (for the target) and from the target (for the\n"
"client) so far; None when no such flow is live.");

static PyObject *
TCPEngine_counters(TCPEngine *self, PyObject *arg)
{
    uint64_t id;
    if (parseFlowId(arg, &id) < 0)
        return NULL;
    if (checkReady(self) < 0)
        return NULL;
    uint64_t in = 0, out = 0;
    pthread_mutex_lock(&self->lock);
    Flow *f = tableFind(self, id);
    if (f != NULL) {
        in = __atomic_load_n(&f->dir[0].bytes, __ATOMIC_RELAXED);
        out = __atomic_load_n(&f->dir[1].bytes, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&self->lock);
    if (f == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(KK)", (unsigned long long)in, (unsigned long long)out);
}

PyDoc_STRVAR(snapshot_doc,
"snapshot() -> list of (flowId, bytesIn, bytesOut)\n\n"
"The counters of every live flow.");

static PyObject *
TCPEngine_snapshot(TCPEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    /* Copy under the lock, build Python objects after it. */
    pthread_mutex_lock(&self->lock);
    size_t count = self->flows.count;
    uint64_t *rows = malloc((count ? count : 1) * 3 * sizeof(uint64_t));
    size_t k = 0;
    if (rows != NULL) {
        ID_TABLE_EACH(&self->flows, i, entry, next) {
            Flow *f = ENTRY_OF(entry, Flow, entry);
            rows[k++] = entry->id;
            rows[k++] = __atomic_load_n(&f->dir[0].bytes, __ATOMIC_RELAXED);
            rows[k++] = __atomic_load_n(&f->dir[1].bytes, __ATOMIC_RELAXED);
        }
    }
    pthread_mutex_unlock(&self->lock);
    if (rows == NULL)
        return PyErr_NoMemory();
    PyObject *list = PyList_New((Py_ssize_t)(k / 3));
    if (list != NULL) {
        for (size_t j = 0; j < k / 3; j++) {
            PyObject *row = Py_BuildValue("(KKK)", (unsigned long long)rows[3 * j],
                                          (unsigned long long)rows[3 * j + 1],
                                          (unsigned long long)rows[3 * j + 2]);
            if (row == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)j, row);
        }
    }
    free(rows);
    return list;
}

PyDoc_STRVAR(reports_doc,
"reports() -> list of (flowId, bytesIn, bytesOut, reason)\n\n"
"Flows that ended since the last call, oldest first, and clears the\n"
"readiness of fileno().  reason is one of 'client closed', 'target\n"
"closed' (the side that finished sending first, both directions having\n"
"ended cleanly), 'reset by client', 'reset by target', 'idle timeout',\n"
"'killed', 'proxy stopped', 'out of memory'.");

static PyObject *takeReports(TCPEngine *self, int grouped, double now);

static PyObject *
TCPEngine_reports(TCPEngine *self, PyObject *unused)
{
    return takeReports(self, 0, 0.0);
}

PyDoc_STRVAR(finished_doc,
"finished(now) -> (reports, groups)\n\n"
"What reports() returns, but for the flows dialed with access (see\n"
"dial()): reports, as reports() gives them, of the others; groups, one\n"
"(tag, flowIds, lines, rows, durations, bytesIn, bytesOut) per run of\n"
"flows of one access, oldest first: their ids; their access lines joined\n"
"by newlines, each head + client + arrow + '%.3fs in=%d out=%d reason'\n"
"(duration: now - started); one (flowId, listener, client, duration,\n"
"bytesIn, bytesOut, None, reason) row each; their durations; and their\n"
"bytes summed.");

/* A group of finished(): the flows of one access, being gathered; their
 * access lines are written into text, one Python str made at the end. */
typedef struct Group {
    PyObject *access, *ids, *rows, *durations;
    char *text;
    size_t length, capacity;
    unsigned long long bytesIn, bytesOut;
} Group;

static void
groupClear(Group *g)
{
    Py_CLEAR(g->ids);
    Py_CLEAR(g->rows);
    Py_CLEAR(g->durations);
    free(g->text);
    g->text = NULL;
    g->length = g->capacity = 0;
    g->access = NULL;
    g->bytesIn = g->bytesOut = 0;
}

/* Close g into groups (when it has flows); 0, or -1 with an error set. */
static int
groupFlush(Group *g, PyObject *groups)
{
    if (g->access == NULL)
        return 0;
    PyObject *text = PyUnicode_DecodeUTF8(g->text, (Py_ssize_t)g->length, "replace");
    PyObject *item = text ? Py_BuildValue("(OOOOOKK)", PyTuple_GET_ITEM(g->access, 0),
                                          g->ids, text, g->rows, g->durations, g->bytesIn,
                                          g->bytesOut)
                          : NULL;
    Py_XDECREF(text);
    int failed = item == NULL || PyList_Append(groups, item) < 0;
    Py_XDECREF(item);
    groupClear(g);
    return failed ? -1 : 0;
}

/* Room for more bytes at the end of g's text; -1 (an error set) without. */
static int
groupRoom(Group *g, size_t more)
{
    if (g->length + more <= g->capacity)
        return 0;
    size_t capacity = g->capacity ? g->capacity : 1024;
    while (capacity < g->length + more)
        capacity *= 2;
    char *grown = realloc(g->text, capacity);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    g->text = grown;
    g->capacity = capacity;
    return 0;
}

/* Append the UTF-8 of the str s to g's text; -1 (an error set) on failure. */
static int
groupWrite(Group *g, PyObject *s)
{
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &size);
    if (utf8 == NULL || groupRoom(g, (size_t)size) < 0)
        return -1;
    memcpy(g->text + g->length, utf8, (size_t)size);
    g->length += (size_t)size;
    return 0;
}

/* The reason of a report as a str: the engine's reasons are a handful of
 * static strings, each made into a str once per call of takeReports. */
typedef struct Reasons {
    const char *text[8];
    PyObject *str[8];
    int count;
} Reasons;

static PyObject *
reasonOf(Reasons *cache, const char *reason)
{
    for (int i = 0; i < cache->count; i++)
        if (cache->text[i] == reason)
            return Py_NewRef(cache->str[i]);
    PyObject *str = PyUnicode_FromString(reason);
    if (str != NULL && cache->count < 8) {
        cache->text[cache->count] = reason;
        cache->str[cache->count++] = Py_NewRef(str);
    }
    return str;
}

static void
reasonsClear(Reasons *cache)
{
    for (int i = 0; i < cache->count; i++)
        Py_DECREF(cache->str[i]);
    cache->count = 0;
}

/* Add the report r of a flow with access to g; 0, or -1 with an error set. */
static int
groupAdd(Group *g, PyObject *groups, const Report *r, double now, Reasons *reasons)
{
    if (r->access != g->access) {
        if (groupFlush(g, groups) < 0)
            return -1;
        g->ids = PyList_New(0);
        g->rows = PyList_New(0);
        g->durations = PyList_New(0);
        if (!g->ids || !g->rows || !g->durations)
            return -1;
        g->access = r->access;
    } else if (groupRoom(g, 1) < 0) {
        return -1;
    } else {
        g->text[g->length++] = '\n';
    }
    double duration = now - r->started;
    if (groupWrite(g, PyTuple_GET_ITEM(r->access, 2)) < 0 || groupWrite(g, r->client) < 0 ||
        groupWrite(g, PyTuple_GET_ITEM(r->access, 3)) < 0)
        return -1;
    char tail[160];
    int size = snprintf(tail, sizeof tail, "%.3fs in=%llu out=%llu ", duration,
                        (unsigned long long)r->bytesIn, (unsigned long long)r->bytesOut);
    size_t reasonLength = strlen(r->reason);
    if (size < 0 || (size_t)size >= sizeof tail ||
        groupRoom(g, (size_t)size + reasonLength) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "an access line's figures overflow");
        return -1;
    }
    memcpy(g->text + g->length, tail, (size_t)size);
    memcpy(g->text + g->length + size, r->reason, reasonLength);
    g->length += (size_t)size + reasonLength;
    PyObject *row = PyTuple_New(8);
    PyObject *id = PyLong_FromUnsignedLongLong((unsigned long long)r->id);
    PyObject *elapsed = PyFloat_FromDouble(duration);
    PyObject *in = PyLong_FromUnsignedLongLong((unsigned long long)r->bytesIn);
    PyObject *out = PyLong_FromUnsignedLongLong((unsigned long long)r->bytesOut);
    PyObject *reason = reasonOf(reasons, r->reason);
    int failed = !row || !id || !elapsed || !in || !out || !reason ||
                 PyList_Append(g->ids, id) < 0 || PyList_Append(g->durations, elapsed) < 0;
    if (!failed) {
        PyTuple_SET_ITEM(row, 0, Py_NewRef(id));
        PyTuple_SET_ITEM(row, 1, Py_NewRef(PyTuple_GET_ITEM(r->access, 1)));
        PyTuple_SET_ITEM(row, 2, Py_NewRef(r->client));
        PyTuple_SET_ITEM(row, 3, Py_NewRef(elapsed));
        PyTuple_SET_ITEM(row, 4, Py_NewRef(in));
        PyTuple_SET_ITEM(row, 5, Py_NewRef(out));
        PyTuple_SET_ITEM(row, 6, Py_NewRef(Py_None));
        PyTuple_SET_ITEM(row, 7, Py_NewRef(reason));
        failed = PyList_Append(g->rows, row) < 0;
    }
    Py_XDECREF(row);
    Py_XDECREF(id);
    Py_XDECREF(elapsed);
    Py_XDECREF(in);
    Py_XDECREF(out);
    Py_XDECREF(reason);
    if (failed)
        return -1;
    g->bytesIn += r->bytesIn;
    g->bytesOut += r->bytesOut;
    return 0;
}

/* reports() (grouped 0: every report a tuple, in one list) or
 * finished(now) (grouped 1). */
static PyObject *
takeReports(TCPEngine *self, int grouped, double now)
{
    if (checkReady(self) < 0)
        return NULL;
    /* Clear the eventfd before looking at the queue: a flow that ends
     * after this read signals it again, so none is left unreported. */
    drainFd(self->notifyFd);
    const char *items;
    pthread_mutex_lock(&self->lock);
    size_t count = reportsQueued(&self->reports, &items);
    pthread_mutex_unlock(&self->lock);
    PyObject *plain = PyList_New(0);
    PyObject *groups = PyList_New(0);
    Group g = {0};
    Reasons reasons = {0};
    int failed = plain == NULL || groups == NULL;
    for (size_t i = 0; !failed && i < count; i++) {
        const Report *r = (const Report *)items + i;
        if (grouped && r->access != NULL) {
            failed = groupAdd(&g, groups, r, now, &reasons) < 0;
            continue;
        }
        PyObject *row = Py_BuildValue("(KKKs)", (unsigned long long)r->id,
                                      (unsigned long long)r->bytesIn,
                                      (unsigned long long)r->bytesOut, r->reason);
        failed = row == NULL || PyList_Append(plain, row) < 0;
        Py_XDECREF(row);
    }
    if (!failed)
        failed = groupFlush(&g, groups) < 0;
    groupClear(&g);
    reasonsClear(&reasons);
    PyObject *result = NULL;
    if (!failed) {
        result = plain;
        if (grouped)
            result = PyTuple_Pack(2, plain, groups);
        else
            Py_INCREF(result);
    }
    Py_XDECREF(plain);
    Py_XDECREF(groups);
    if (result == NULL) {
        /* Out of memory: the reports stay queued; signal again so that
         * the next call has them. */
        signalFd(self->notifyFd);
        return NULL;
    }
    dropAccess((const Report *)items, count);
    pthread_mutex_lock(&self->lock);
    reportsTaken(&self->reports, count);
    pthread_mutex_unlock(&self->lock);
    return result;
}

static PyObject *
TCPEngine_finished(TCPEngine *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    return takeReports(self, 1, now);
}

PyDoc_STRVAR(stop_doc,
"stop() -> None\n\n"
"End every flow (reason 'proxy stopped', both sockets reset) and join every\n"
"relay thread; reports() then returns their reports.  Later adopts raise\n"
"RuntimeError.  Safe to call more than once.");

static PyObject *
TCPEngine_stop(TCPEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_mutex_unlock(&self->lock);
    if (self->started && !self->joined) {
        /* Every worker sees the flag when its wake eventfd fires. */
        engineJoinWorkers((EngineBase *)self, self->workers, sizeof(Worker),
                          self->workerCount);
        Py_DECREF(self);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(threadFlows_doc,
"threadFlows() -> list of int\n\n"
"Live flows per relay thread, one entry per thread: a flow belongs to\n"
"thread flowId mod N, for its whole life.");

static PyObject *
TCPEngine_threadFlows(TCPEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    size_t counts[MAX_THREADS];
    int n = self->workerCount;
    pthread_mutex_lock(&self->lock);
    for (int i = 0; i < n; i++)
        counts[i] = self->workers[i].flowCount;
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New(n);
    for (int i = 0; list != NULL && i < n; i++) {
        PyObject *count = PyLong_FromSize_t(counts[i]);
        if (count == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, count);
    }
    return list;
}

PyDoc_STRVAR(pollCounters_doc,
"pollCounters() -> (polls, caught, preempted)\n\n"
"The busy-poll of every relay thread together: the polls begun after a\n"
"batch of request/response traffic, those of them that caught an event\n"
"before the ceiling ran out, and those during which the thread was preempted (each ends polling for\n"
"a while).");

static PyObject *
TCPEngine_pollCounters(TCPEngine *self, PyObject *unused)
{
    if (self->workers == NULL)  /* never initialised */
        return pollCounters(NULL, 0, sizeof(Worker));
    return pollCounters(&self->workers[0].poll, (size_t)self->workerCount, sizeof(Worker));
}

static PyMethodDef TCPEngine_methods[] = {
    {"adopt", (PyCFunction)TCPEngine_adopt, METH_VARARGS, adopt_doc},
    {"dial", (PyCFunction)TCPEngine_dial, METH_VARARGS, dial_doc},
    {"close", (PyCFunction)TCPEngine_close, METH_O, close_doc},
    {"counters", (PyCFunction)TCPEngine_counters, METH_O, counters_doc},
    {"snapshot", (PyCFunction)TCPEngine_snapshot, METH_NOARGS, snapshot_doc},
    {"reports", (PyCFunction)TCPEngine_reports, METH_NOARGS, reports_doc},
    {"finished", (PyCFunction)TCPEngine_finished, METH_O, finished_doc},
    {"stop", (PyCFunction)TCPEngine_stop, METH_NOARGS, stop_doc},
    {"threadFlows", (PyCFunction)TCPEngine_threadFlows, METH_NOARGS, threadFlows_doc},
    {"pollCounters", (PyCFunction)TCPEngine_pollCounters, METH_NOARGS, pollCounters_doc},
    ENGINE_COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(TCPEngine_doc,
"TCPEngine(pipeSize=1048576, bufferSize=65536, busyPoll=50, threads=0)\n\n"
"Relay threads for established TCP connections: threads of them (0: one\n"
"per CPU this process may use, at most 16), each with its own epoll and\n"
"the flows whose flowId mod N is its index.  pipeSize is asked of\n"
"F_SETPIPE_SZ for each direction's pipe (0: never splice, relay through\n"
"a bufferSize userspace buffer instead); bufferSize is also used where a\n"
"pipe cannot be had.  busyPoll: how long, in microseconds, a thread\n"
"polls after a small batch of request/response traffic before it sleeps\n"
"(0: never poll, sleep at once).");

static PyTypeObject TCPEngineType =
    ENGINE_TYPE(TCPEngine, "twistedproxy.tcp._engine.TCPEngine", TCPEngine_doc);

/* -- accepting ------------------------------------------------------------ */

PyDoc_STRVAR(accept_doc,
"accept(listeningFd) -> (fd, 'host:port') or None\n\n"
"One accept4() on a non-blocking listening socket: the client's descriptor,\n"
"non-blocking and close-on-exec (what adopt(exclusive=True) wants), and\n"
"its address as the access log writes it ('[::1]:5000' for IPv6).  None\n"
"when no client is waiting; OSError for any other failure.");

/* A listening descriptor argument: 0, or -1 with a Python error set. */
static int
parseListeningFd(PyObject *arg, int *fd)
{
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < 0 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "accept needs a file descriptor");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

/* One accept4() of a client, non-blocking and close-on-exec, and its
 * address as the access log writes it: (fd, 'host:port'); None when no
 * client is waiting; NULL with errno set (and no Python error) when
 * accept4 failed, or with a Python error set (the client closed). */
static PyObject *
acceptOne(int listeningFd)
{
    struct sockaddr_storage address;
    socklen_t length = sizeof(address);
    int client = accept4(listeningFd, (struct sockaddr *)&address, &length,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return NULL;
    }
    char host[INET6_ADDRSTRLEN] = "?";
    char text[INET6_ADDRSTRLEN + 16];
    if (address.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&address;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        snprintf(text, sizeof(text), "[%s]:%u", host, (unsigned)ntohs(a->sin6_port));
    } else if (address.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&address;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        snprintf(text, sizeof(text), "%s:%u", host, (unsigned)ntohs(a->sin_port));
    } else {
        snprintf(text, sizeof(text), "%s:0", host);
    }
    PyObject *result = Py_BuildValue("(is)", client, text);
    if (result == NULL)
        close(client);
    return result;
}

static PyObject *
fastrelay_accept(PyObject *module, PyObject *arg)
{
    int fd;
    if (parseListeningFd(arg, &fd) < 0)
        return NULL;
    PyObject *client = acceptOne(fd);
    if (client == NULL && !PyErr_Occurred())
        return PyErr_SetFromErrno(PyExc_OSError);
    return client;
}

PyDoc_STRVAR(acceptBatch_doc,
"acceptBatch(listeningFd, most) -> (clients, errno)\n\n"
"accept() up to most clients waiting on a non-blocking listening socket in\n"
"one call: clients is a list of (fd, 'host:port') as accept() gives them.\n"
"errno is 0 when the queue was emptied or most were taken; else the\n"
"accept4() error that stopped the batch (EMFILE, ENOBUFS, ...), for the\n"
"caller to deal with after the clients it has.  Errors that concern one\n"
"client only (ECONNABORTED, EPROTO, EPERM, EINTR) skip it.");

static PyObject *
fastrelay_acceptBatch(PyObject *module, PyObject *args)
{
    PyObject *fdArg;
    Py_ssize_t most;
    if (!PyArg_ParseTuple(args, "On:acceptBatch", &fdArg, &most))
        return NULL;
    int fd;
    if (parseListeningFd(fdArg, &fd) < 0)
        return NULL;
    PyObject *clients = PyList_New(0);
    if (clients == NULL)
        return NULL;
    int error = 0;
    while (PyList_GET_SIZE(clients) < most) {
        PyObject *client = acceptOne(fd);
        if (client == NULL) {
            if (PyErr_Occurred())
                goto failed;
            if (errno == ECONNABORTED || errno == EPROTO || errno == EPERM || errno == EINTR)
                continue;
            error = errno;
            break;
        }
        if (client == Py_None) {
            Py_DECREF(client);
            break;
        }
        int appended = PyList_Append(clients, client);
        Py_DECREF(client);
        if (appended < 0)
            goto failed;
    }
    return Py_BuildValue("(Ni)", clients, error);

failed:
    /* Out of memory: the clients accepted so far are closed. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(clients); i++)
        close((int)PyLong_AsLong(PyTuple_GET_ITEM(PyList_GET_ITEM(clients, i), 0)));
    Py_DECREF(clients);
    return NULL;
}

static PyMethodDef fastrelayFunctions[] = {
    {"accept", (PyCFunction)fastrelay_accept, METH_O, accept_doc},
    {"acceptBatch", (PyCFunction)fastrelay_acceptBatch, METH_VARARGS, acceptBatch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engineModuleDefinition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedproxy.tcp._engine",
    .m_doc = "The compiled relay engine for established TCP connections (Linux).",
    .m_size = -1,
    .m_methods = fastrelayFunctions,
};

PyMODINIT_FUNC
PyInit__engine(void)
{
    PyObject *m = engineModule(&engineModuleDefinition, &TCPEngineType, "TCPEngine");
    if (m == NULL)
        return NULL;
    PyModule_AddIntConstant(m, "DEFAULT_PIPE_SIZE", DEFAULT_PIPE_SIZE);
    PyModule_AddIntConstant(m, "DEFAULT_BUFFER_SIZE", DEFAULT_BUFFER_SIZE);
    PyModule_AddIntConstant(m, "DEFAULT_BUSY_POLL_US", DEFAULT_BUSY_POLL_US);
    return m;
}
