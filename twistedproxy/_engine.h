/*
 * The skeleton twistedproxy's three compiled engines share:
 * tcp/_engine.c (TCPEngine: established TCP connections, splice),
 * udp/_engine.c (UDPEngine: established UDP sessions, recvmmsg/sendmmsg)
 * and tcp/_tlsengine.c (TLSEngine: TLS termination with OpenSSL, the
 * handshake and then the relay to the target).
 *
 * An engine is a Python object with a background thread of its own (the
 * TCP and TLS engines: several, each with its own epoll and wakeFd,
 * sharing the engine's mutex, id table, report queue and notifyFd; see
 * "engines with several threads" below).
 * All three speak one vocabulary:
 *
 *   - a flow is what the engine forwards (a TCP connection's two sockets,
 *     a UDP session's connected socket, a TLS client and then its target),
 *     named by a 64-bit flow id that Python chooses; adopt() hands one
 *     over, close(id) ends it, counters(id) reads its bytes, flowCount()
 *     counts the live ones (TLS: the client, with the address of the
 *     target the engine dials once the handshake is done);
 *   - a report is what the thread tells Python (a flow ended; for UDP
 *     also a new client; for TLS also a handshake done); reports() takes
 *     them, oldest first;
 *   - wakeFd: an eventfd by which Python wakes the thread (in the
 *     thread's epoll set, its events carry the engine's wake data);
 *     notifyFd: an eventfd by which the thread wakes the reactor, which
 *     watches fileno() == notifyFd and then calls reports();
 *   - stop() ends every flow and joins the thread.
 *
 * What is here: the descriptors (epoll + wakeFd + notifyFd), the thread
 * start (every signal blocked, a set stack size), the id table (flow id
 * -> flow, intrusive), the report queue whose slots are reserved when a
 * flow is adopted, so that posting a report never needs memory and never
 * fails, and the CPython boilerplate (the common head of the engine
 * objects, tp_new, fileno(), flowCount(), the module init).
 *
 * The locking rule, for every engine: one mutex per engine guards what
 * the reactor thread and the engine thread share (the id table, the
 * report queue, the command queue or the tables Python edits).  Neither
 * thread holds it during an I/O system call on a flow's sockets (recv,
 * send, splice, sendmmsg, SSL_do_handshake, SSL_read, ...) nor while it
 * builds Python objects: data is copied out under the mutex and turned
 * into Python objects after it.
 * Byte counters the engine thread alone writes are read with relaxed
 * atomic loads where the reader does not hold the mutex the writer does.
 */

#ifndef TWISTEDPROXY_ENGINE_H
#define TWISTEDPROXY_ENGINE_H

#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* The engine thread's stack: its deepest frame is a batch of messages on
 * the stack (UDP: DRAIN of them) or OpenSSL's handshake (TLS), well under
 * this. */
#define ENGINE_STACK_SIZE (256 * 1024)

/* -- wake and notify ------------------------------------------------------ */

/* Add one to an eventfd's counter, which wakes whoever waits on it. */
static void
signalFd(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
    /* EAGAIN: the counter is already non-zero, the reader wakes anyway. */
}

/* Read an eventfd's counter back to zero. */
static void
drainFd(int fd)
{
    uint64_t value;
    ssize_t r;
    do {
        r = read(fd, &value, sizeof value);
    } while (r < 0 && errno == EINTR);
}

/* -- the id table: flow id -> flow ---------------------------------------- */

/* Embedded in each flow; ENTRY_OF gets the flow back from it. */
typedef struct IdEntry {
    uint64_t id;
    struct IdEntry *next;
} IdEntry;

#define ENTRY_OF(entry, type, member) ((type *)((char *)(entry) - offsetof(type, member)))

typedef struct {
    IdEntry **buckets;
    size_t mask;   /* buckets - 1, a power of two minus one */
    size_t count;
} IdTable;

static size_t
idSlot(const IdTable *t, uint64_t id)
{
    uint64_t h = id * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 32) & t->mask;
}

/* size: a power of two.  0, or -1 without memory (no Python error set). */
static int
idTableInit(IdTable *t, size_t size)
{
    t->buckets = calloc(size, sizeof(IdEntry *));
    if (t->buckets == NULL)
        return -1;
    t->mask = size - 1;
    t->count = 0;
    return 0;
}

static IdEntry *
idTableFind(const IdTable *t, uint64_t id)
{
    IdEntry *e = t->buckets[idSlot(t, id)];
    while (e != NULL && e->id != id)
        e = e->next;
    return e;
}

/* Make sure one more entry can be linked without memory: 0, or -1. */
static int
idTableMakeRoom(IdTable *t)
{
    if (t->count + 1 <= t->mask + 1)
        return 0;
    size_t size = (t->mask + 1) * 2;
    IdEntry **buckets = calloc(size, sizeof(IdEntry *));
    if (buckets == NULL)
        return -1;
    IdEntry **old = t->buckets;
    size_t oldSize = t->mask + 1;
    t->buckets = buckets;
    t->mask = size - 1;
    for (size_t i = 0; i < oldSize; i++) {
        IdEntry *e = old[i];
        while (e != NULL) {
            IdEntry *next = e->next;
            size_t s = idSlot(t, e->id);
            e->next = buckets[s];
            buckets[s] = e;
            e = next;
        }
    }
    free(old);
    return 0;
}

/* Link an entry whose id is not in the table: 0, or -1 without memory. */
static int
idTableInsert(IdTable *t, IdEntry *e)
{
    if (idTableMakeRoom(t) < 0)
        return -1;
    size_t s = idSlot(t, e->id);
    e->next = t->buckets[s];
    t->buckets[s] = e;
    t->count++;
    return 0;
}

static void
idTableRemove(IdTable *t, IdEntry *e)
{
    IdEntry **p = &t->buckets[idSlot(t, e->id)];
    while (*p != NULL && *p != e)
        p = &(*p)->next;
    if (*p == e) {
        *p = e->next;
        t->count--;
    }
}

/* Every entry of table t: ID_TABLE_EACH(t, i, e, next) { ... } declares
 * the bucket index i and the entries e and next; the body may remove e
 * from the table (next is read before it runs). */
#define ID_TABLE_EACH(t, i, e, next)                                   \
    for (size_t i = 0; i <= (t)->mask; i++)                            \
        for (IdEntry *e = (t)->buckets[i], *next = e ? e->next : NULL; \
             e != NULL; e = next, next = e ? e->next : NULL)

/* -- the report queue ----------------------------------------------------- */

/*
 * Reports of fixed size, in one array.  Every live flow has a slot
 * reserved in it (reportReserve, by the reactor thread at adopt, under the
 * mutex), so the engine thread's reportPost never needs memory.  Only the
 * reactor thread grows the array, so reportsTaken can read the queued
 * reports without the mutex while the engine thread appends after them.
 */
typedef struct {
    char *items;
    size_t itemSize;
    size_t count;     /* queued */
    size_t reserved;  /* slots promised to live flows */
    size_t capacity;  /* >= count + reserved */
} ReportQueue;

/* Reserve n slots (mutex held, reactor thread): 0, or -1 without memory. */
static int
reportReserve(ReportQueue *q, size_t n)
{
    size_t need = q->count + q->reserved + n;
    if (need > q->capacity) {
        size_t capacity = q->capacity ? q->capacity : 64;
        while (capacity < need)
            capacity *= 2;
        char *grown = realloc(q->items, capacity * q->itemSize);
        if (grown == NULL)
            return -1;
        q->items = grown;
        q->capacity = capacity;
    }
    q->reserved += n;
    return 0;
}

/* A flow ended without a report (its end was returned to Python at
 * once): give its slot back.  Mutex held. */
static void
reportRelease(ReportQueue *q)
{
    q->reserved--;
}

/* Take a reserved slot for a report and return it to be filled in.  Mutex
 * held; never fails. */
static void *
reportPost(ReportQueue *q)
{
    q->reserved--;
    return q->items + q->itemSize * q->count++;
}

/* How many reports are queued, and where (reactor thread, mutex held):
 * they stay valid and in place after the mutex is released, whatever the
 * engine thread posts meanwhile, until reportsTaken. */
static size_t
reportsQueued(ReportQueue *q, const char **items)
{
    *items = q->items;
    return q->count;
}

/* The first n reports have been turned into Python objects: drop them
 * (reactor thread, mutex held). */
static void
reportsTaken(ReportQueue *q, size_t n)
{
    q->count -= n;
    if (q->count > 0)
        memmove(q->items, q->items + q->itemSize * n, q->itemSize * q->count);
}

/* -- the common head of the engine objects --------------------------------- */

#define ENGINE_HEAD                                                         \
    PyObject_HEAD                                                           \
    /* set at construction, read-only afterwards */                         \
    int epfd;                                                               \
    int wakeFd;    /* eventfd: Python -> thread (commands, new work) */     \
    int notifyFd;  /* eventfd: thread -> reactor (reports are queued) */    \
    /* reactor thread only */                                               \
    int started;                                                            \
    int joined;                                                             \
    pthread_t thread;                                                       \
    /* shared, under lock */                                                \
    pthread_mutex_t lock;                                                   \
    int stopping;                                                           \
    IdTable flows;                                                          \
    ReportQueue reports;

typedef struct {
    ENGINE_HEAD
} EngineBase;

/* Take the mutex from the reactor thread; when the engine thread has it,
 * wait for it without the GIL, so that other Python threads run. */
static void
engineLock(EngineBase *self)
{
    if (pthread_mutex_trylock(&self->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->lock);
        Py_END_ALLOW_THREADS
    }
}

/* tp_new of every engine: every descriptor -1 (tp_init opens them). */
static PyObject *
engineNew(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    EngineBase *self = (EngineBase *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = self->wakeFd = self->notifyFd = -1;
    pthread_mutex_init(&self->lock, NULL);
    return (PyObject *)self;
}

/*
 * Open an engine's epoll instance, its two eventfds (non-blocking,
 * close-on-exec) with wakeFd in the epoll set under wakeData, its id
 * table and its report queue of itemSize reports.  0 on success; -1 with
 * a Python error set, engineFree releasing whatever was had.
 */
static int
engineOpen(EngineBase *self, epoll_data_t wakeData, size_t tableSize, size_t itemSize)
{
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine already initialised");
        return -1;
    }
    self->reports.itemSize = itemSize;
    if (idTableInit(&self->flows, tableSize) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notifyFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->wakeFd < 0 || self->notifyFd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data = wakeData};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wakeFd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Close the descriptors, free the table and queue (the flows are the
 * engine's to free first), destroy the mutex: the end of tp_dealloc. */
static void
engineFree(EngineBase *self)
{
    free(self->flows.buckets);
    self->flows.buckets = NULL;
    free(self->reports.items);
    self->reports.items = NULL;
    if (self->epfd >= 0)
        close(self->epfd);
    if (self->wakeFd >= 0)
        close(self->wakeFd);
    if (self->notifyFd >= 0)
        close(self->notifyFd);
    self->epfd = self->wakeFd = self->notifyFd = -1;
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * Start one engine thread running main(arg): ENGINE_STACK_SIZE of stack
 * and every signal blocked (see engineStartThread, which starts an
 * engine's only thread with it; an engine with several threads, such as
 * the TCP engine, starts each of them with it).  0, or -1 with OSError set.
 */
static int
engineSpawn(pthread_t *thread, void *(*main)(void *), void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, ENGINE_STACK_SIZE);
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int rc = pthread_create(thread, &attr, main, arg);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/*
 * Start the engine thread, once: ENGINE_STACK_SIZE of stack, and every
 * signal blocked, so that signals (SIGHUP for reload, SIGCHLD, SIGINT) go
 * to the reactor's thread and a SIGPIPE from a send to a reset socket is
 * never delivered.  The thread holds a reference to the engine until
 * engineJoin.  0, or -1 with OSError set.
 */
static int
engineStartThread(EngineBase *self, void *(*main)(void *))
{
    if (self->started)
        return 0;
    if (engineSpawn(&self->thread, main, self) < 0)
        return -1;
    self->started = 1;
    Py_INCREF(self);
    return 0;
}

/* Wake the thread (which has been told to stop) and wait for it without
 * the GIL.  The caller drops the thread's reference when it is done with
 * what the thread left. */
static void
engineJoin(EngineBase *self)
{
    if (!self->started || self->joined)
        return;
    signalFd(self->wakeFd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->joined = 1;
}

/* A flow id argument: 0, or -1 with a Python error set. */
static int
parseFlowId(PyObject *arg, uint64_t *id)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *id = value;
    return 0;
}

static PyObject *
engineFileno(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(((EngineBase *)self)->notifyFd);
}

static PyObject *
engineFlowCount(PyObject *self, PyObject *unused)
{
    EngineBase *e = (EngineBase *)self;
    engineLock(e);
    size_t n = e->flows.count;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromSize_t(n);
}

/* The methods every engine has alike, for their method tables. */
#define ENGINE_COMMON_METHODS                                              \
    {"fileno", engineFileno, METH_NOARGS,                                  \
     "fileno() -> int\n\nAn eventfd (notifyFd) that becomes readable when " \
     "reports() has something to return."},                               \
    {"flowCount", engineFlowCount, METH_NOARGS,                            \
     "flowCount() -> int\n\nLive flows (adopted and not yet ended)."}

/* The type object of an engine whose C struct, tp_init, tp_dealloc and
 * method table are NAME, NAME_init, NAME_dealloc and NAME_methods. */
#define ENGINE_TYPE(NAME, qualifiedName, doc)       \
    {                                               \
        PyVarObject_HEAD_INIT(NULL, 0)              \
        .tp_name = qualifiedName,                   \
        .tp_basicsize = sizeof(NAME),               \
        .tp_flags = Py_TPFLAGS_DEFAULT,             \
        .tp_doc = doc,                              \
        .tp_new = engineNew,                        \
        .tp_init = (initproc)NAME##_init,           \
        .tp_dealloc = (destructor)NAME##_dealloc,   \
        .tp_methods = NAME##_methods,               \
    }

/* Create an engine's module holding its type under the type's own name.
 * NULL with a Python error set. */
static PyObject *
engineModule(PyModuleDef *definition, PyTypeObject *type, const char *name)
{
    if (PyType_Ready(type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(definition);
    if (m == NULL)
        return NULL;
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}


/* -- engines with several threads ------------------------------------------ */

/*
 * An engine may run several threads (the TCP and TLS engines), each with
 * its own epoll instance and wake eventfd and its share of the flows,
 * sharing the engine's mutex, id table, report queue and notifyFd.  By
 * default one per CPU this process may run on, at most
 * ENGINE_DEFAULT_MAX_THREADS; never more than ENGINE_MAX_THREADS
 * (Python's PORTPROXY_ENGINE_THREADS asks for a number).  These are
 * inline so that an engine with one thread (UDP) need not use them.
 */
#define ENGINE_DEFAULT_MAX_THREADS 16
#define ENGINE_MAX_THREADS 256

/* The default number of an engine's threads: the CPUs this process may
 * run on (sched_getaffinity), at most ENGINE_DEFAULT_MAX_THREADS. */
static inline int
engineDefaultThreads(void)
{
    cpu_set_t cpus;
    int n = 1;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0)
        n = CPU_COUNT(&cpus);
    if (n < 1)
        n = 1;
    return n > ENGINE_DEFAULT_MAX_THREADS ? ENGINE_DEFAULT_MAX_THREADS : n;
}

/* The coarse monotonic clock in seconds (a few ms of resolution, no
 * system call): what the engines' timeouts and sweeps are measured by. */
static inline double
engineCoarseNow(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* What the struct of each thread of such an engine starts with (its
 * first member).  Worker 0 uses the engine's own epfd and wakeFd and is
 * the engine's thread (ENGINE_HEAD); the others open theirs. */
typedef struct EngineWorker {
    /* set at construction, read-only afterwards */
    int epfd;
    int wakeFd;
    /* reactor thread only */
    int started;
    pthread_t thread;
} EngineWorker;

#define ENGINE_WORKER(workers, stride, i) \
    ((EngineWorker *)((char *)(workers) + (stride) * (size_t)(i)))

/* Open a further worker's epoll instance and wake eventfd (non-blocking,
 * close-on-exec), the eventfd in the epoll set under wakeData.  0, or -1
 * with OSError set (engineCloseWorker closes what was opened). */
static inline int
engineOpenWorker(EngineWorker *w, epoll_data_t wakeData)
{
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->epfd < 0 || w->wakeFd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data = wakeData};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakeFd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Close what engineOpenWorker opened (a worker other than 0). */
static inline void
engineCloseWorker(EngineWorker *w)
{
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->wakeFd >= 0)
        close(w->wakeFd);
    w->epfd = w->wakeFd = -1;
}

/* How many threads an engine asked for `threads` runs (0: the default,
 * engineDefaultThreads), or -1 with ValueError set. */
static inline int
engineThreadCount(long threads)
{
    if (threads < 0 || threads > ENGINE_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be between 1 and %d (0: the default)",
                     ENGINE_MAX_THREADS);
        return -1;
    }
    return threads > 0 ? (int)threads : engineDefaultThreads();
}

/*
 * Allocate an engine's count workers into *workers, zeroed, stride bytes
 * each (each starting with its EngineWorker): worker 0 on the engine's
 * own epfd and wakeFd, the others with their own (engineOpenWorker, the
 * wake eventfd's events carrying wakeData).  *opened counts the workers
 * set up so far, which engineCloseWorkers takes.  0, or -1 with an
 * exception set.
 */
static inline int
engineOpenWorkers(EngineBase *e, void **workers, size_t stride, int count, int *opened,
                  epoll_data_t wakeData)
{
    *workers = calloc((size_t)count, stride);
    if (*workers == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < count; i++) {
        EngineWorker *w = ENGINE_WORKER(*workers, stride, i);
        w->epfd = w->wakeFd = -1;
        *opened = i + 1;
        if (i == 0) {
            w->epfd = e->epfd;
            w->wakeFd = e->wakeFd;
        } else if (engineOpenWorker(w, wakeData) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Close what engineOpenWorkers opened (opened workers of workers) and
 * free them. */
static inline void
engineCloseWorkers(void *workers, size_t stride, int opened)
{
    for (int i = 1; i < opened; i++)
        engineCloseWorker(ENGINE_WORKER(workers, stride, i));
    free(workers);
}

/*
 * Start every thread of workers[0..count) not yet running (stride: the
 * size of the engine's worker struct): worker 0 as the skeleton's engine
 * thread running firstMain(engine) (engineStartThread: the engine holds a
 * reference to itself until it is joined), the others main(worker),
 * through engineSpawn alike.  0, or -1 with OSError set (the threads that
 * did start keep running; the next call tries the rest).
 */
static inline int
engineStartWorkers(EngineBase *e, void *workers, size_t stride, int count,
                   void *(*firstMain)(void *), void *(*main)(void *))
{
    if (engineStartThread(e, firstMain) < 0)
        return -1;
    ENGINE_WORKER(workers, stride, 0)->started = 1;
    for (int i = 1; i < count; i++) {
        EngineWorker *w = ENGINE_WORKER(workers, stride, i);
        if (w->started)
            continue;
        if (engineSpawn(&w->thread, main, w) < 0)
            return -1;
        w->started = 1;
    }
    return 0;
}

/* Wake every started worker (stopping is set: each ends its flows) and
 * join them without the GIL, worker 0 last through engineJoin.  The
 * caller drops the engine's reference to itself when it is done. */
static inline void
engineJoinWorkers(EngineBase *e, void *workers, size_t stride, int count)
{
    for (int i = 1; i < count; i++)
        if (ENGINE_WORKER(workers, stride, i)->started)
            signalFd(ENGINE_WORKER(workers, stride, i)->wakeFd);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < count; i++)
        if (ENGINE_WORKER(workers, stride, i)->started)
            pthread_join(ENGINE_WORKER(workers, stride, i)->thread, NULL);
    Py_END_ALLOW_THREADS
    engineJoin(e);
}

/* -- the busy-poll ---------------------------------------------------------- */

/*
 * After a batch of request/response traffic an engine thread may poll its
 * epoll instance (epoll_wait with a zero timeout) for up to a ceiling
 * (the engines' busyPoll, microseconds) before it sleeps: the answer to
 * what it just relayed often comes sooner than a sleeping thread is woken,
 * and on a virtual machine a vCPU woken from idle costs more CPU than the
 * poll.  Polling pays only while the CPU it burns is idle otherwise, so:
 *
 *   - a poll during which the thread was preempted (two reads of the
 *     clock in the poll loop POLL_PREEMPTED_NS or more apart: the
 *     scheduler gave the CPU to something else for about a time slice)
 *     ends polling for POLL_BACKOFF_NS: the peers that produce the next
 *     event need that CPU more than the thread needs to be awake when it
 *     comes;
 *   - the threads of one engine (the TCP relay threads) share a gate, so
 *     that at most one of them polls at a time: polling never takes
 *     more than one core from the peers;
 *   - a thread polls only while few flows (POLL_MAX_FLOWS) were active
 *     in its current and its last window of POLL_FLOW_WINDOW_MS: the
 *     poll pays for the next turn of a few request/response flows; with
 *     many at once the thread seldom waits long, and the CPU a poll
 *     burns is taken from the peers that produce the traffic (32
 *     kept-alive HTTP connections from wrk: a quarter more CPU per
 *     request with the poll, and fewer requests a second, on two cores;
 *     docs/PERFORMANCE.md "Polling only for a few flows").
 *
 * The poll lasts the whole ceiling rather than a window fitted to the
 * waits it sees: the poll itself shortens the wait (a round trip through
 * a polling thread takes half the time, docs/PERFORMANCE.md "The
 * busy-poll on a quiet machine"), so a window fitted to the waits of a
 * sleeping thread shrinks to nothing and never finds out.  A shorter
 * threshold for a preemption (20 us) fired on the hypervisor's own
 * jitter and kept polling off on an idle machine.
 *
 * The caller says which batches may be followed by a poll (the TCP and
 * UDP engines: one in which a flow turned direction and that moved
 * little, while pollFewFlows); after the others the thread sleeps at
 * once, so a bulk stream never polls.
 */

/* The default ceiling, microseconds (the engines' busyPoll argument). */
#define POLL_DEFAULT_CEILING_US 50
/* No poll after a batch that moved this many bytes: that is bulk. */
#define POLL_MAX_BATCH (64 * 1024)
/* A gap this long between two turns of the poll loop is a preemption. */
#define POLL_PREEMPTED_NS 500000
/* No poll for this long after a preempted one. */
#define POLL_BACKOFF_NS 50000000
/* No poll while more flows than this were active in a window... */
#define POLL_MAX_FLOWS 4
/* ...of this many milliseconds (the current one or the last). */
#define POLL_FLOW_WINDOW_MS 10

typedef struct {
    int64_t ceiling;   /* ns a poll lasts at most; 0: never poll */
    int64_t quietUntil; /* no poll before this time (ns), after a preemption */
    int *gate;         /* shared by an engine's threads: 1 while one polls */
    int64_t windowEnd; /* ms: the end of the current window of flows */
    uint32_t window;   /* the current window's number, from 1 */
    uint32_t flows, lastFlows; /* flows active in it, and in the last one */
    /* statistics, written by the thread alone, read with relaxed loads */
    uint64_t polls;    /* polls begun */
    uint64_t caught;   /* polls that caught an event */
    uint64_t preempted; /* polls during which the thread was preempted */
} AdaptivePoll;

/* The monotonic clock in nanoseconds. */
static inline int64_t
pollClockNs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void
pollCount(uint64_t *counter)
{
    __atomic_store_n(counter, *counter + 1, __ATOMIC_RELAXED);
}

/* Set up p to poll for up to ceilingUs microseconds (0: never), one
 * thread of the engine at a time through gate. */
static inline void
pollInit(AdaptivePoll *p, long ceilingUs, int *gate)
{
    p->ceiling = (int64_t)ceilingUs * 1000;
    p->gate = gate;
    p->window = 1;
}

/* At the start of a batch, at nowMs on the engine's clock: begin a new
 * window of flows once the current one is over. */
static inline void
pollBatch(AdaptivePoll *p, int64_t nowMs)
{
    if (nowMs >= p->windowEnd) {
        /* A window that passed without a batch had no flows. */
        p->lastFlows = nowMs < p->windowEnd + POLL_FLOW_WINDOW_MS ? p->flows : 0;
        p->flows = 0;
        p->window++;
        p->windowEnd = nowMs + POLL_FLOW_WINDOW_MS;
    }
}

/* A flow moved bytes in this batch; *stamp is the flow's own, zeroed when
 * it is created, so that it is counted once per window. */
static inline void
pollSawFlow(AdaptivePoll *p, uint32_t *stamp)
{
    if (*stamp != p->window) {
        *stamp = p->window;
        p->flows++;
    }
}

/* Whether few enough flows were active lately for a poll to pay. */
static inline int
pollFewFlows(const AdaptivePoll *p)
{
    return p->flows <= POLL_MAX_FLOWS && p->lastFlows <= POLL_MAX_FLOWS;
}

/*
 * epoll_wait for an engine thread, with the busy-poll: after a batch the
 * caller calls it with eligible set when that batch may be followed by a
 * poll.  Then it polls for up to p->ceiling ns first (unless a preemption
 * ended polling for a while, or another thread of the engine polls);
 * otherwise it is a plain epoll_wait.  Returns what epoll_wait returns.
 */
static inline int
pollWait(AdaptivePoll *p, int epfd, struct epoll_event *events, int max, int timeoutMs,
         int eligible)
{
    if (!eligible || p->ceiling <= 0)
        return epoll_wait(epfd, events, max, timeoutMs);
    int64_t start = pollClockNs();
    if (start >= p->quietUntil && __atomic_exchange_n(p->gate, 1, __ATOMIC_ACQUIRE) == 0) {
        pollCount(&p->polls);
        int64_t until = start + p->ceiling;
        int64_t before = start, now;
        int preempted = 0, n;
        do {
            n = epoll_wait(epfd, events, max, 0);
            now = pollClockNs();
            preempted |= now - before >= POLL_PREEMPTED_NS;
            before = now;
        } while (n == 0 && now < until);
        __atomic_store_n(p->gate, 0, __ATOMIC_RELEASE);
        if (preempted) {
            pollCount(&p->preempted);
            p->quietUntil = now + POLL_BACKOFF_NS;
        }
        if (n != 0) {
            if (n > 0)
                pollCount(&p->caught);
            return n;
        }
    }
    return epoll_wait(epfd, events, max, timeoutMs);
}

/* (polls, caught, preempted) of some AdaptivePolls together, for an
 * engine's pollCounters(): relaxed loads, as the threads write them. */
static inline PyObject *
pollCounters(const AdaptivePoll *polls, size_t count, size_t stride)
{
    uint64_t begun = 0, caught = 0, preempted = 0;
    for (size_t i = 0; i < count; i++) {
        const AdaptivePoll *p = (const AdaptivePoll *)((const char *)polls + i * stride);
        begun += __atomic_load_n(&p->polls, __ATOMIC_RELAXED);
        caught += __atomic_load_n(&p->caught, __ATOMIC_RELAXED);
        preempted += __atomic_load_n(&p->preempted, __ATOMIC_RELAXED);
    }
    return Py_BuildValue("(KKK)", (unsigned long long)begun, (unsigned long long)caught,
                         (unsigned long long)preempted);
}

#endif
