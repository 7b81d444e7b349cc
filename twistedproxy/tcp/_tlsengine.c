/*
 * twistedproxy.tcp._tlsengine: the compiled fast path of TLS termination
 * (docs/tls.md, "The fast path"), the third engine on the skeleton of
 * ../_engine.h, whose vocabulary it speaks (flows, reports, wakeFd and
 * notifyFd, adopt/close/counters/reports/flowCount/fileno/stop).
 *
 * Python accepts each client of a `tls:` listener and admits it as for
 * plain TCP, then hands the client's socket descriptor to this engine
 * (adopt) with the target's address, and the engine runs the TLS
 * handshake on it with OpenSSL (SSL_set_fd, no memory BIOs) in one of its
 * threads (the flow's: flowId mod N), non-blocking, under epoll.  When the
 * handshake is done the engine reports it, with the client's server name
 * (SNI) and certificate subject, and dials the target itself (a
 * non-blocking connect, within the connect timeout counted from the
 * adopt); when the target answers the engine relays:
 * SSL_read -> send(target), recv(target) -> SSL_write, through one bounded
 * buffer per direction, with TLS close_notify and TCP FIN mapped onto each
 * other (half-close).  When the connection ends the engine reports the
 * bytes each way and why.
 *
 * Threads, as the skeleton has them: Python's calls run in the reactor
 * thread with the GIL; the engine threads never take the GIL.  They share
 * the id table, the report queue and the command queue (a connection with
 * bits of what to do, linked through the connection itself, so that a
 * command needs no memory) under the engine's mutex, which neither holds
 * during an SSL_* or socket call nor while building Python objects.  Each
 * flow has two report slots reserved at adopt (its handshake, its end).
 * The flow's engine thread alone frees a connection: after the event batch in
 * which it ended (later events of the batch may still point at it), or,
 * when Python had queued a command for it meanwhile, once it takes the
 * connection from the command queue.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_engine.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* Plaintext bytes buffered per direction and connection: two TLS records. */
#define BUFFER_SIZE (32 * 1024)
/* (Taken while they hold bytes, given back when empty: see ready.) */

/* How often the engine looks for idle connections, in milliseconds. */
#define IDLE_SCAN_MS 250

#define EVENTS_PER_WAIT 64

/* ------------------------------------------------------------------------ */
/* Certificates: an SSL_CTX per key pair, chosen by the client's server name */

/*
 * The contexts of one `tls:` setting: the default one, which clients
 * without a matching server name get, and one per named key pair.  Shared
 * by the Python Context object that made it and every connection that
 * uses it; freed when the last lets go, so a reload that builds new ones
 * leaves open connections their own.
 */
typedef struct ContextSet {
    atomic_int refs;
    SSL_CTX *defaultContext;
    int count;
    char **names;       /* lower case; a suffix entry starts with '.' */
    SSL_CTX **contexts; /* by name, in the order to try */
} ContextSet;

static void
contextSetRelease(ContextSet *set)
{
    if (set == NULL || atomic_fetch_sub(&set->refs, 1) != 1)
        return;
    for (int i = 0; i < set->count; i++) {
        free(set->names[i]);
        SSL_CTX_free(set->contexts[i]);
    }
    free(set->names);
    free(set->contexts);
    SSL_CTX_free(set->defaultContext);
    free(set);
}

/* The context for server name `name`: exact names first, then suffixes
 * (longest first), as twistedproxy.tls.NameTable does; NULL for none. */
static SSL_CTX *
contextForName(ContextSet *set, const char *name)
{
    char lower[256];
    size_t n = strlen(name);
    if (n == 0 || n >= sizeof lower)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        lower[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    while (n > 0 && lower[n - 1] == '.')
        n--;
    lower[n] = '\0';
    for (int i = 0; i < set->count; i++) {
        const char *entry = set->names[i];
        if (entry[0] != '.') {
            if (strcmp(entry, lower) == 0)
                return set->contexts[i];
        } else {
            size_t m = strlen(entry);
            if (n >= m && memcmp(lower + n - m, entry, m) == 0)
                return set->contexts[i];
        }
    }
    return NULL;
}

static int
serverNameCallback(SSL *ssl, int *alert, void *arg)
{
    ContextSet *set = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name != NULL) {
        SSL_CTX *context = contextForName(set, name);
        if (context != NULL)
            SSL_set_SSL_CTX(ssl, context);
    }
    return SSL_TLSEXT_ERR_OK;
}

/* The proxy cannot know the target's application protocols: it selects
 * none, and the client speaks its default (as the Python path does). */
static int
noApplicationProtocol(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                      const unsigned char *in, unsigned int inlen, void *arg)
{
    return SSL_TLSEXT_ERR_NOACK;
}

/* Set a Python ValueError from OpenSSL's error queue, after `what`. */
static void
setSSLError(const char *what)
{
    unsigned long code = ERR_peek_last_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    PyErr_Format(PyExc_ValueError, "%s: %s", what, reason ? reason : "unknown error");
    ERR_clear_error();
}

/* One server context from PEM bytes: the certificate chain (leaf first)
 * and its key; the client CAs (or NULL) for mutual TLS. */
static SSL_CTX *
buildContext(const char *certPem, Py_ssize_t certLen, const char *keyPem,
             Py_ssize_t keyLen, const char *caPem, Py_ssize_t caLen, int minVersion)
{
    SSL_CTX *context = SSL_CTX_new(TLS_server_method());
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    if (context == NULL)
        goto failed;
    SSL_CTX_set_min_proto_version(context, minVersion);
    SSL_CTX_set_options(context, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                     SSL_OP_CIPHER_SERVER_PREFERENCE |
                                     SSL_OP_IGNORE_UNEXPECTED_EOF);
    /* As nginx: the chain sent is the certificate file's (no chain built
     * from the certificate store at every handshake, which with client_ca
     * would be the client CAs), and OpenSSL reads what the socket has in
     * one recv rather than a record header and then its body. */
    SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                  SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
    SSL_CTX_set_read_ahead(context, 1);
    /* Sessions resume by tickets (TLS 1.3: two per handshake, as nginx);
     * the context id lets a client with a certificate resume too.  No
     * server-side cache: stateless tickets need none, and it would hold
     * every session for its lifetime and scan itself every 255 handshakes. */
    SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
    static const unsigned char sessionContext[] = "portproxy";
    SSL_CTX_set_session_id_context(context, sessionContext, sizeof sessionContext - 1);
    SSL_CTX_set_alpn_select_cb(context, noApplicationProtocol, NULL);

    bio = BIO_new_mem_buf(certPem, (int)certLen);
    if (bio == NULL || (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL ||
        SSL_CTX_use_certificate(context, cert) != 1)
        goto failed;
    X509 *chain;
    while ((chain = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (SSL_CTX_add0_chain_cert(context, chain) != 1) {
            X509_free(chain);
            goto failed;
        }
    }
    ERR_clear_error(); /* the end of the PEM data */
    BIO_free(bio);
    bio = BIO_new_mem_buf(keyPem, (int)keyLen);
    if (bio == NULL || (key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL ||
        SSL_CTX_use_PrivateKey(context, key) != 1 || SSL_CTX_check_private_key(context) != 1)
        goto failed;
    BIO_free(bio);
    bio = NULL;
    if (caPem != NULL) {
        X509_STORE *store = SSL_CTX_get_cert_store(context);
        STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
        if (names == NULL)
            goto failed;
        bio = BIO_new_mem_buf(caPem, (int)caLen);
        X509 *ca;
        int found = 0;
        while (bio != NULL && (ca = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
            X509_STORE_add_cert(store, ca);
            X509_NAME *name = X509_NAME_dup(X509_get_subject_name(ca));
            if (name != NULL)
                sk_X509_NAME_push(names, name);
            X509_free(ca);
            found++;
        }
        ERR_clear_error();
        SSL_CTX_set_client_CA_list(context, names);
        if (!found)
            goto failed;
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    return context;
failed:
    setSSLError("cannot build the TLS context");
    BIO_free(bio);
    X509_free(cert);
    EVP_PKEY_free(key);
    SSL_CTX_free(context);
    return NULL;
}

typedef struct {
    PyObject_HEAD
    ContextSet *set;
} Context;

static void
Context_dealloc(Context *self)
{
    contextSetRelease(self->set);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * Context(pairs, names, clientCA, minVersion): pairs, a list of
 * (certPem, keyPem), the first the default; names, a list of (name,
 * index into pairs) in the order to try ("*.suffix" or exact, lower
 * case); clientCA, PEM bytes or None; minVersion, "1.2" or "1.3".
 */
static int
Context_init(Context *self, PyObject *args, PyObject *kwds)
{
    PyObject *pairs, *names, *clientCA;
    const char *version;
    if (!PyArg_ParseTuple(args, "O!O!Os", &PyList_Type, &pairs, &PyList_Type, &names,
                          &clientCA, &version))
        return -1;
    int minVersion = strcmp(version, "1.3") == 0 ? TLS1_3_VERSION : TLS1_2_VERSION;
    const char *ca = NULL;
    Py_ssize_t caLen = 0;
    if (clientCA != Py_None && PyBytes_AsStringAndSize(clientCA, (char **)&ca, &caLen) < 0)
        return -1;
    Py_ssize_t pairCount = PyList_GET_SIZE(pairs), nameCount = PyList_GET_SIZE(names);
    if (pairCount < 1) {
        PyErr_SetString(PyExc_ValueError, "Context needs a key pair");
        return -1;
    }
    SSL_CTX **built = calloc((size_t)pairCount, sizeof *built);
    ContextSet *set = calloc(1, sizeof *set);
    if (set != NULL) {
        set->names = calloc((size_t)nameCount + 1, sizeof *set->names);
        set->contexts = calloc((size_t)nameCount + 1, sizeof *set->contexts);
    }
    if (built == NULL || set == NULL || set->names == NULL || set->contexts == NULL) {
        free(built);
        if (set != NULL) {
            free(set->names);
            free(set->contexts);
            free(set);
        }
        PyErr_NoMemory();
        return -1;
    }
    atomic_init(&set->refs, 1);
    for (Py_ssize_t i = 0; i < pairCount; i++) {
        const char *cert, *key;
        Py_ssize_t certLen, keyLen;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(pairs, i), "y#y#", &cert, &certLen, &key,
                              &keyLen) ||
            (built[i] = buildContext(cert, certLen, key, keyLen, ca, caLen, minVersion)) ==
                NULL)
            goto failed;
    }
    for (Py_ssize_t i = 0; i < nameCount; i++) {
        const char *name;
        Py_ssize_t index;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(names, i), "sn", &name, &index))
            goto failed;
        if (index < 0 || index >= pairCount) {
            PyErr_SetString(PyExc_IndexError, "Context name index out of range");
            goto failed;
        }
        if (name[0] == '*' && name[1] == '.')
            name++;
        if ((set->names[set->count] = strdup(name)) == NULL) {
            PyErr_NoMemory();
            goto failed;
        }
        SSL_CTX_up_ref(built[index]);
        set->contexts[set->count++] = built[index];
    }
    set->defaultContext = built[0];
    built[0] = NULL;
    for (Py_ssize_t i = 1; i < pairCount; i++)
        SSL_CTX_free(built[i]);
    free(built);
    if (set->count > 0) {
        SSL_CTX_set_tlsext_servername_callback(set->defaultContext, serverNameCallback);
        SSL_CTX_set_tlsext_servername_arg(set->defaultContext, set);
    }
    contextSetRelease(self->set);
    self->set = set;
    return 0;
failed:
    for (Py_ssize_t i = 0; i < pairCount; i++)
        SSL_CTX_free(built[i]);
    free(built);
    contextSetRelease(set);
    return -1;
}

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twistedproxy.tcp._tlsengine.Context",
    .tp_basicsize = sizeof(Context),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The OpenSSL contexts of one tls: setting (see Context_init).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Context_init,
    .tp_dealloc = (destructor)Context_dealloc,
};

/* ------------------------------------------------------------------------ */
/* Connections                                                               */

enum { HANDSHAKE, DIALING, RELAYING, ENDED };
enum { CMD_ADOPT = 1, CMD_CLOSE = 2, CMD_KILL = 4 };
enum { REPORT_HANDSHAKE, REPORT_END };

/* Reports each flow posts: its handshake (when it gets that far), its end. */
#define REPORTS_PER_FLOW 2

/* What the reactor learns of a flow, copied out of it when it happens. */
typedef struct Report {
    uint64_t id;
    int kind;
    union {
        struct {
            char *subject; /* malloc'd, the report's; NULL for none */
            char serverName[256];
        } handshake;
        struct {
            unsigned long long bytesIn, bytesOut;
            char reason[200];
        } end;
    };
} Report;

typedef struct Buffer {
    char *data;
    size_t start, length;
} Buffer;

typedef struct Conn Conn;

struct Conn {
    IdEntry entry; /* the flow id, in the engine's id table */
    int clientFd, targetFd;
    SSL *ssl;
    ContextSet *set;
    int state;
    double idleTimeout, lastActive;
    /* The target the engine dials once the handshake is done, and by
     * when the handshake and the dial are to be done (adopt's
     * connectTimeout after the adopt; none for 0). */
    struct sockaddr_storage target;
    socklen_t targetLength;
    double connectTimeout, deadline;
    /* Shared with Python, under the engine's mutex. */
    unsigned commands;
    int queued, orphan;
    Conn *nextCommand;
    /* Its engine thread's own. */
    Conn *prevLive, *nextLive, *nextDead;
    int done, handshakeReported;
    uint32_t clientEvents, targetEvents;
    unsigned clientEof : 1, targetEof : 1, targetShut : 1, notifySent : 1;
    unsigned readWantsWrite : 1, writeWantsRead : 1, writeWantsWrite : 1,
        shutdownWantsWrite : 1, handshakeWantsWrite : 1;
    Buffer toTarget, toClient;
    const char *finishedFirst;
    _Atomic unsigned long long bytesIn, bytesOut;
};

typedef struct TLSEngine TLSEngine;

/*
 * One engine thread and what it alone owns: its epoll instance and wake
 * eventfd (worker 0: the engine's), its connections (those workerOf
 * gives it) and their command queue.
 */
typedef struct Worker {
    EngineWorker base; /* epfd, wakeFd, started, thread */
    TLSEngine *engine;
    /* shared, under the engine's lock */
    Conn *commandHead, *commandTail;
    size_t flowCount; /* live connections it owns */
    /* this worker's thread only */
    Conn *live;
    Conn *graveyard; /* ended in this batch; freed after it */
    int reported;    /* a report was posted in this batch */
    double now;
} Worker;

struct TLSEngine {
    ENGINE_HEAD
    /* set at construction, read-only afterwards */
    int workerCount;
    Worker *workers;
};

/* The worker that owns flow id for its whole life: the id modulo the
 * number of threads, as in the TCP engine (consecutive ids go round the
 * threads). */
static Worker *
workerOf(TLSEngine *e, uint64_t id)
{
    return &e->workers[id % (uint64_t)e->workerCount];
}


/* The live connection with id `id`, or NULL (caller holds the lock). */
static Conn *
connFind(TLSEngine *e, uint64_t id)
{
    IdEntry *entry = idTableFind(&e->flows, id);
    return entry == NULL ? NULL : ENTRY_OF(entry, Conn, entry);
}

/* -- the engine thread: epoll --------------------------------------------- */

/* A socket's events when it is not in the epoll set. */
#define UNWATCHED 0xffffffffu

static void endConn(Worker *w, Conn *conn, const char *reason, int resetClient,
                    int resetTarget);

/* Watch one side of a connection for `events`; none takes the socket out
 * of the set, since epoll reports a hang-up whatever is asked, and a
 * side that is done both ways would keep waking the thread. */
static void
watch(Worker *w, Conn *conn, int side, uint32_t events)
{
    uint32_t *current = side ? &conn->targetEvents : &conn->clientEvents;
    if (conn->done || *current == events || (events == 0 && *current == UNWATCHED))
        return;
    int fd = side ? conn->targetFd : conn->clientFd;
    if (events == 0) {
        epoll_ctl(w->base.epfd, EPOLL_CTL_DEL, fd, NULL);
        *current = UNWATCHED;
        return;
    }
    struct epoll_event ev = {.events = events,
                             .data.ptr = (void *)((uintptr_t)conn | (uintptr_t)side)};
    if (epoll_ctl(w->base.epfd, *current == UNWATCHED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev) <
        0) {
        endConn(w, conn, "tls engine could not watch the sockets", 1, 1);
        return;
    }
    *current = events;
}

static void
closeWithReset(int fd)
{
    struct linger reset = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    close(fd);
}

/* A connection the engine is done with goes to the graveyard, freed after
 * the current event batch. */
static void
bury(Worker *w, Conn *conn)
{
    conn->nextDead = w->graveyard;
    w->graveyard = conn;
}

static void
freeDead(Worker *w)
{
    Conn *conn = w->graveyard;
    w->graveyard = NULL;
    while (conn != NULL) {
        Conn *next = conn->nextDead;
        free(conn);
        conn = next;
    }
}

/* End a connection: close both sockets (with a reset where asked), free
 * its TLS state, take it out of the id table and post its end report. */
static void
endConn(Worker *w, Conn *conn, const char *reason, int resetClient, int resetTarget)
{
    if (conn->done)
        return;
    conn->done = 1;
    if (conn->clientFd >= 0) {
        epoll_ctl(w->base.epfd, EPOLL_CTL_DEL, conn->clientFd, NULL);
        if (resetClient)
            closeWithReset(conn->clientFd);
        else
            close(conn->clientFd);
        conn->clientFd = -1;
    }
    if (conn->targetFd >= 0) {
        epoll_ctl(w->base.epfd, EPOLL_CTL_DEL, conn->targetFd, NULL);
        if (resetTarget)
            closeWithReset(conn->targetFd);
        else
            close(conn->targetFd);
        conn->targetFd = -1;
    }
    SSL_free(conn->ssl);
    conn->ssl = NULL;
    contextSetRelease(conn->set);
    conn->set = NULL;
    free(conn->toTarget.data);
    free(conn->toClient.data);
    conn->toTarget.data = conn->toClient.data = NULL;
    conn->state = ENDED;
    if (conn->prevLive != NULL)
        conn->prevLive->nextLive = conn->nextLive;
    else if (w->live == conn)
        w->live = conn->nextLive;
    if (conn->nextLive != NULL)
        conn->nextLive->prevLive = conn->prevLive;
    conn->prevLive = conn->nextLive = NULL;
    pthread_mutex_lock(&w->engine->lock);
    idTableRemove(&w->engine->flows, &conn->entry);
    w->flowCount--;
    if (!conn->handshakeReported)
        reportRelease(&w->engine->reports);
    Report *report = reportPost(&w->engine->reports);
    report->id = conn->entry.id;
    report->kind = REPORT_END;
    report->end.bytesIn = atomic_load_explicit(&conn->bytesIn, memory_order_relaxed);
    report->end.bytesOut = atomic_load_explicit(&conn->bytesOut, memory_order_relaxed);
    snprintf(report->end.reason, sizeof report->end.reason, "%s", reason);
    /* A command Python queued for it meanwhile: runCommands buries it when
     * it takes it from the queue. */
    int queued = conn->queued;
    if (queued)
        conn->orphan = 1;
    pthread_mutex_unlock(&w->engine->lock);
    w->reported = 1;
    if (!queued)
        bury(w, conn);
}

/* Why the last TLS call failed, in OpenSSL's words ("tls: ..."). */
static void
tlsFailure(int error, char *out, size_t size)
{
    unsigned long code;
    size_t used = (size_t)snprintf(out, size, "tls: ");
    int any = 0;
    const char *last = NULL;
    while ((code = ERR_get_error()) != 0) {
        const char *reason = ERR_reason_error_string(code);
        if (reason == NULL || (last != NULL && strcmp(last, reason) == 0))
            continue;
        if (used < size)
            used += (size_t)snprintf(out + used, size - used, "%s%s", any ? "; " : "", reason);
        last = reason;
        any = 1;
    }
    if (!any)
        snprintf(out, size, "tls: error %d", error);
}

/* -- the handshake --------------------------------------------------------- */

/* The subject of the client's certificate, malloc'd; NULL for none. */
static char *
peerSubject(Conn *conn)
{
    X509 *peer = SSL_get0_peer_certificate(conn->ssl);
    if (peer == NULL)
        return NULL;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL)
        return NULL;
    /* RFC 4514 text as cryptography's rfc4514_string writes it. */
    X509_NAME_print_ex(bio, X509_get_subject_name(peer), 0,
                       XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
    char *text;
    long length = BIO_get_mem_data(bio, &text);
    char *subject = malloc((size_t)length + 1);
    if (subject != NULL) {
        memcpy(subject, text, (size_t)length);
        subject[length] = '\0';
    }
    BIO_free(bio);
    return subject;
}

static void dialTarget(Worker *w, Conn *conn);

static void
handshake(Worker *w, Conn *conn)
{
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(conn->ssl);
    if (r == 1) {
        const char *name = SSL_get_servername(conn->ssl, TLSEXT_NAMETYPE_host_name);
        char *subject = peerSubject(conn);
        conn->state = DIALING;
        pthread_mutex_lock(&w->engine->lock);
        Report *report = reportPost(&w->engine->reports);
        report->id = conn->entry.id;
        report->kind = REPORT_HANDSHAKE;
        report->handshake.subject = subject;
        snprintf(report->handshake.serverName, sizeof report->handshake.serverName, "%s",
                 name != NULL ? name : "");
        pthread_mutex_unlock(&w->engine->lock);
        conn->handshakeReported = 1;
        w->reported = 1;
        dialTarget(w, conn);
        return;
    }
    int error = SSL_get_error(conn->ssl, r);
    char reason[sizeof ((Report *)NULL)->end.reason];
    switch (error) {
    case SSL_ERROR_WANT_READ:
        watch(w, conn, 0, EPOLLIN);
        return;
    case SSL_ERROR_WANT_WRITE:
        watch(w, conn, 0, EPOLLOUT);
        return;
    case SSL_ERROR_ZERO_RETURN:
        endConn(w, conn, "client closed", 0, 0);
        return;
    case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() == 0) {
            endConn(w, conn, errno == 0 ? "client closed" : "reset by client", 0, 0);
            return;
        }
        /* fall through */
    default:
        tlsFailure(error, reason, sizeof reason);
        endConn(w, conn, reason, 0, 0);
    }
}
/* -- relaying -------------------------------------------------------------- */

static size_t
space(Buffer *b)
{
    if (b->length == 0)
        b->start = 0;
    else if (b->start + b->length == BUFFER_SIZE && b->start > 0) {
        memmove(b->data, b->data + b->start, b->length);
        b->start = 0;
    }
    return BUFFER_SIZE - b->start - b->length;
}

/* A buffer's memory, taken when it is about to be filled: an idle
 * connection holds none (0 when there is none to take). */
static int
ready(Buffer *b)
{
    if (b->data == NULL)
        b->data = malloc(BUFFER_SIZE);
    return b->data != NULL;
}

static void
releaseIfEmpty(Buffer *b)
{
    if (b->length == 0) {
        free(b->data);
        b->data = NULL;
        b->start = 0;
    }
}

/* Move what can move, both ways, until nothing does; then watch for what
 * would let more move, and end the connection once both ways are done. */
static void
pump(Worker *w, Conn *conn)
{
    Buffer *up = &conn->toTarget, *down = &conn->toClient;
    int moved = 0;
    for (;;) {
        int progress = 0;
        /* client -> buffer */
        if (!conn->clientEof && space(up) > 0) {
            if (!ready(up)) {
                endConn(w, conn, "out of memory", 1, 1);
                return;
            }
            ERR_clear_error();
            errno = 0;
            int n = SSL_read(conn->ssl, up->data + up->start + up->length, (int)space(up));
            conn->readWantsWrite = 0;
            if (n > 0) {
                up->length += (size_t)n;
                atomic_fetch_add_explicit(&conn->bytesIn, (unsigned long long)n,
                                          memory_order_relaxed);
                progress = 1;
            } else {
                int error = SSL_get_error(conn->ssl, n);
                if (error == SSL_ERROR_WANT_WRITE)
                    conn->readWantsWrite = 1;
                else if (error == SSL_ERROR_ZERO_RETURN ||
                         (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno == 0)) {
                    conn->clientEof = 1;
                    if (conn->finishedFirst == NULL)
                        conn->finishedFirst = "client closed";
                    progress = 1;
                } else if (error != SSL_ERROR_WANT_READ) {
                    char reason[sizeof ((Report *)NULL)->end.reason];
                    if (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
                        snprintf(reason, sizeof reason, "reset by client");
                    else
                        tlsFailure(error, reason, sizeof reason);
                    endConn(w, conn, reason, 1, 1);
                    return;
                }
            }
        }
        /* buffer -> target */
        if (up->length > 0) {
            ssize_t n = send(conn->targetFd, up->data + up->start, up->length, MSG_NOSIGNAL);
            if (n > 0) {
                up->start += (size_t)n;
                up->length -= (size_t)n;
                progress = 1;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                endConn(w, conn, "reset by target", 1, 1);
                return;
            }
        }
        if (conn->clientEof && up->length == 0 && !conn->targetShut) {
            shutdown(conn->targetFd, SHUT_WR);
            conn->targetShut = 1;
        }
        /* target -> buffer */
        if (!conn->targetEof && space(down) > 0) {
            if (!ready(down)) {
                endConn(w, conn, "out of memory", 1, 1);
                return;
            }
            ssize_t n = recv(conn->targetFd, down->data + down->start + down->length,
                             space(down), 0);
            if (n > 0) {
                down->length += (size_t)n;
                progress = 1;
            } else if (n == 0) {
                conn->targetEof = 1;
                if (conn->finishedFirst == NULL)
                    conn->finishedFirst = "target closed";
                progress = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                endConn(w, conn, "reset by target", 1, 1);
                return;
            }
        }
        /* buffer -> client */
        if (down->length > 0) {
            ERR_clear_error();
            int n = SSL_write(conn->ssl, down->data + down->start, (int)down->length);
            conn->writeWantsRead = conn->writeWantsWrite = 0;
            if (n > 0) {
                down->start += (size_t)n;
                down->length -= (size_t)n;
                atomic_fetch_add_explicit(&conn->bytesOut, (unsigned long long)n,
                                          memory_order_relaxed);
                progress = 1;
            } else {
                int error = SSL_get_error(conn->ssl, n);
                if (error == SSL_ERROR_WANT_WRITE)
                    conn->writeWantsWrite = 1;
                else if (error == SSL_ERROR_WANT_READ)
                    conn->writeWantsRead = 1;
                else {
                    endConn(w, conn, "reset by client", 1, 1);
                    return;
                }
            }
        }
        /* the target's FIN -> close_notify, then the client's FIN */
        if (conn->targetEof && down->length == 0 && !conn->notifySent) {
            ERR_clear_error();
            int r = SSL_shutdown(conn->ssl);
            conn->shutdownWantsWrite = 0;
            if (r < 0 && SSL_get_error(conn->ssl, r) == SSL_ERROR_WANT_WRITE) {
                conn->shutdownWantsWrite = 1;
            } else {
                conn->notifySent = 1;
                shutdown(conn->clientFd, SHUT_WR);
                progress = 1;
            }
        }
        if (!progress)
            break;
        moved = 1;
    }
    if (moved)
        conn->lastActive = w->now;
    if (conn->clientEof && conn->targetShut && conn->notifySent) {
        endConn(w, conn, conn->finishedFirst ? conn->finishedFirst : "closed", 0, 0);
        return;
    }
    releaseIfEmpty(up);
    releaseIfEmpty(down);
    uint32_t client = 0, target = 0;
    if ((!conn->clientEof && space(up) > 0 && !conn->readWantsWrite) || conn->writeWantsRead)
        client |= EPOLLIN;
    if (conn->readWantsWrite || conn->writeWantsWrite || conn->shutdownWantsWrite)
        client |= EPOLLOUT;
    if (!conn->targetEof && space(down) > 0)
        target |= EPOLLIN;
    if (up->length > 0)
        target |= EPOLLOUT;
    watch(w, conn, 0, client);
    watch(w, conn, 1, target);
}

/* -- commands -------------------------------------------------------------- */

static void
startConn(Worker *w, Conn *conn)
{
    conn->ssl = SSL_new(conn->set->defaultContext);
    conn->clientEvents = conn->targetEvents = UNWATCHED;
    conn->nextLive = w->live;
    if (w->live != NULL)
        w->live->prevLive = conn;
    w->live = conn;
    if (conn->ssl == NULL || SSL_set_fd(conn->ssl, conn->clientFd) != 1) {
        ERR_clear_error();
        endConn(w, conn, "tls engine could not take the connection", 1, 0);
        return;
    }
    SSL_set_accept_state(conn->ssl);
    handshake(w, conn);
}


/* A graceful close (a failed dial): close_notify, then the FIN; the
 * target, if any, is reset. */
static void
closeGracefully(Worker *w, Conn *conn, const char *reason)
{
    if (conn->state != HANDSHAKE) {
        ERR_clear_error();
        SSL_shutdown(conn->ssl);
        ERR_clear_error();
    }
    if (conn->clientFd >= 0)
        shutdown(conn->clientFd, SHUT_WR);
    endConn(w, conn, reason, 0, 1);
}

/* The engine's own dial failed (errno-style `error`), or the deadline
 * passed (0) before the handshake was done or the target answered: the
 * client gets a close_notify (after a handshake) and a FIN, and the
 * reason reads as the Python path's, "connect failed: connection
 * refused", "connect failed: timed out after 2s", "tls: no handshake in
 * 2s". */
static void
dialFailed(Worker *w, Conn *conn, int error)
{
    char reason[sizeof ((Report *)NULL)->end.reason];
    if (error == 0 && conn->state == HANDSHAKE)
        snprintf(reason, sizeof reason, "tls: no handshake in %gs", conn->connectTimeout);
    else if (error == 0)
        snprintf(reason, sizeof reason, "connect failed: timed out after %gs",
                 conn->connectTimeout);
    else {
        int n = snprintf(reason, sizeof reason, "connect failed: %s", strerror(error));
        for (int i = (int)strlen("connect failed: "); i < n && i < (int)sizeof reason; i++)
            if (reason[i] >= 'A' && reason[i] <= 'Z')
                reason[i] = (char)(reason[i] + 32);
    }
    closeGracefully(w, conn, reason);
}

/* The target answered: relay (what OpenSSL read with the end of the
 * handshake is in its buffer already). */
static void
targetConnected(Worker *w, Conn *conn)
{
    int one = 1;
    setsockopt(conn->targetFd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(conn->targetFd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    conn->state = RELAYING;
    conn->lastActive = w->now;
    pump(w, conn);
}

/* Dial the target, the handshake being done: non-blocking, the
 * connect's end is the target's first writable event (dialed). */
static void
dialTarget(Worker *w, Conn *conn)
{
    int fd = socket(conn->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        dialFailed(w, conn, errno);
        return;
    }
    conn->targetFd = fd;
    if (connect(fd, (struct sockaddr *)&conn->target, conn->targetLength) == 0) {
        targetConnected(w, conn);
    } else if (errno == EINPROGRESS) {
        /* Nothing more from the client until the target answers (a
         * connect done at once, as on loopback, relays straight away
         * with the client still watched: no epoll_ctl pair for it). */
        watch(w, conn, 0, 0);
        watch(w, conn, 1, EPOLLOUT);
    } else {
        dialFailed(w, conn, errno);
    }
}

/* The target's connect ended, one way or the other. */
static void
dialed(Worker *w, Conn *conn)
{
    int error = 0;
    socklen_t length = sizeof error;
    if (getsockopt(conn->targetFd, SOL_SOCKET, SO_ERROR, &error, &length) < 0)
        error = errno;
    if (error != 0)
        dialFailed(w, conn, error);
    else
        targetConnected(w, conn);
}

/* Run the queued commands, one connection at a time; 1 when the engine
 * is to stop. */
static int
runCommands(Worker *w)
{
    for (;;) {
        pthread_mutex_lock(&w->engine->lock);
        Conn *conn = w->commandHead;
        if (conn == NULL) {
            int stopping = w->engine->stopping;
            pthread_mutex_unlock(&w->engine->lock);
            return stopping;
        }
        w->commandHead = conn->nextCommand;
        if (w->commandHead == NULL)
            w->commandTail = NULL;
        unsigned commands = conn->commands;
        conn->commands = 0;
        conn->queued = 0;
        int orphan = conn->orphan;
        pthread_mutex_unlock(&w->engine->lock);
        if (orphan) {
            bury(w, conn);
        } else if (!conn->done) {
            if (commands & CMD_ADOPT)
                startConn(w, conn);
            if (commands & CMD_KILL)
                endConn(w, conn, "killed", 1, 1);
            else if (commands & CMD_CLOSE)
                closeGracefully(w, conn, "closed");
        }
    }
}

static void
scanIdle(Worker *w)
{
    Conn *next;
    for (Conn *conn = w->live; conn != NULL; conn = next) {
        next = conn->nextLive;
        if (conn->state == RELAYING && conn->idleTimeout > 0 &&
            w->now - conn->lastActive >= conn->idleTimeout)
            endConn(w, conn, "idle timeout", 1, 1);
        else if (conn->connectTimeout > 0 && w->now >= conn->deadline &&
                 (conn->state == HANDSHAKE || conn->state == DIALING))
            dialFailed(w, conn, 0);
    }
}

/* The end of a batch: free what ended in it, wake the reactor when
 * reports were posted. */
static void
endBatch(Worker *w)
{
    freeDead(w);
    if (w->reported) {
        w->reported = 0;
        signalFd(w->engine->notifyFd);
    }
}

static void *
engineMain(void *arg)
{
    Worker *w = arg;
    /* "tlsengine0", "tlsengine1", ... in ps and top. */
    char name[16];
    snprintf(name, sizeof name, "tlsengine%d", (int)(w - w->engine->workers));
    pthread_setname_np(pthread_self(), name);
    struct epoll_event events[EVENTS_PER_WAIT];
    double lastScan = engineCoarseNow();
    int stop = 0;
    while (!stop) {
        int n = epoll_wait(w->base.epfd, events, EVENTS_PER_WAIT, IDLE_SCAN_MS);
        w->now = engineCoarseNow();
        for (int i = 0; i < n; i++) {
            uintptr_t data = (uintptr_t)events[i].data.ptr;
            if (data == 0) {
                drainFd(w->base.wakeFd);
                stop |= runCommands(w);
                continue;
            }
            Conn *conn = (Conn *)(data & ~(uintptr_t)1);
            if (conn->done)
                continue;
            if (conn->state == HANDSHAKE)
                handshake(w, conn);
            else if (conn->state == RELAYING)
                pump(w, conn);
            else if (conn->state == DIALING && (data & 1))
                dialed(w, conn);
        }
        if (w->now - lastScan >= IDLE_SCAN_MS / 1000.0) {
            lastScan = w->now;
            scanIdle(w);
        }
        endBatch(w);
    }
    /* Stopping: adopts queued before the stop start (and end below), then
     * every connection ends, gracefully; commands queued for them
     * meanwhile are taken, so that none stays in the queue. */
    runCommands(w);
    while (w->live != NULL)
        endConn(w, w->live, "proxy stopped", 0, 0);
    runCommands(w);
    endBatch(w);
    signalFd(w->engine->notifyFd);
    return NULL;
}

/* Worker 0's thread is the engine's own (engineStartThread gives it the
 * engine). */
static void *
firstWorkerMain(void *engine)
{
    return engineMain(&((TLSEngine *)engine)->workers[0]);
}

/* -- the Python type --------------------------------------------------------- */

/* Queue commands for a live connection on its worker's queue (reactor
 * thread, lock held); the caller then wakes that worker. */
static Worker *
command(TLSEngine *e, Conn *conn, unsigned commands)
{
    Worker *w = workerOf(e, conn->entry.id);
    conn->commands |= commands;
    if (!conn->queued) {
        conn->queued = 1;
        conn->nextCommand = NULL;
        if (w->commandTail != NULL)
            w->commandTail->nextCommand = conn;
        else
            w->commandHead = conn;
        w->commandTail = conn;
    }
    return w;
}

static int
TLSEngine_init(TLSEngine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"threads", NULL};
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i:TLSEngine", kwlist, &threads))
        return -1;
    int count = engineThreadCount(threads);
    if (count < 0)
        return -1;
    /* Events of the wake eventfds carry NULL; a connection's, its Conn
     * with the side (0 client, 1 target) in the low bit. */
    epoll_data_t wakeData = {.ptr = NULL};
    if (engineOpen((EngineBase *)self, wakeData, 1024, sizeof(Report)) < 0)
        return -1;
    if (engineOpenWorkers((EngineBase *)self, (void **)&self->workers, sizeof(Worker), count,
                          &self->workerCount, wakeData) < 0)
        return -1;
    for (int i = 0; i < count; i++)
        self->workers[i].engine = self;
    return 0;
}

static void
TLSEngine_dealloc(TLSEngine *self)
{
    /* A started engine holds a reference to itself until stop() joins its
     * thread, which ends every connection: here there are none, only the
     * reports Python did not take. */
    const char *items;
    size_t count = reportsQueued(&self->reports, &items);
    for (size_t i = 0; i < count; i++) {
        const Report *r = (const Report *)items + i;
        if (r->kind == REPORT_HANDSHAKE)
            free(r->handshake.subject);
    }
    engineCloseWorkers(self->workers, sizeof(Worker), self->workerCount);
    engineFree((EngineBase *)self);
}

static int
checkReady(TLSEngine *self)
{
    if (self->epfd < 0 || self->workers == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TLSEngine not initialised");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(adopt_doc,
             "adopt(fd, flowId, context, target, connectTimeout, idleTimeout)\n\n"
             "Take a client's connected socket and run the TLS handshake on it with\n"
             "context (a Context), then dial target, a (host, port) whose host is\n"
             "an IP address, and relay between the two until both directions end\n"
             "or neither moved a byte for idleTimeout seconds (0: never).  A\n"
             "handshake not done connectTimeout seconds after the adopt (0: no\n"
             "limit) ends the flow (\"tls: no handshake in Ns\") with a FIN to the\n"
             "client; a dial that fails or is not done by then too (\"connect\n"
             "failed: ...\"), with a close_notify and a FIN.  The engine checks\n"
             "every 250 ms.  The engine owns fd from now on; reports() says when\n"
             "the handshake is done, and when the connection ended.  Raises\n"
             "ValueError (duplicate id, context not initialised, target not an\n"
             "address), RuntimeError (engine stopped) or OSError; fd is then still\n"
             "the caller's.");

/* adopt's target: (host, port) with host an IPv4 or IPv6 address.  0, or
 * -1 with ValueError set. */
static int
parseTarget(PyObject *target, struct sockaddr_storage *out, socklen_t *length)
{
    const char *host;
    int port;
    if (!PyArg_ParseTuple(target, "si:target", &host, &port))
        return -1;
    memset(out, 0, sizeof *out);
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (port > 0 && port < 65536 && inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *length = sizeof *v4;
        return 0;
    }
    if (port > 0 && port < 65536 && inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *length = sizeof *v6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "target %s:%d is not an IP address and port", host, port);
    return -1;
}

static PyObject *
TLSEngine_adopt(TLSEngine *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "flowId", "context", "target", "connectTimeout",
                             "idleTimeout", NULL};
    int fd;
    unsigned long long id;
    Context *context;
    PyObject *target;
    double connectTimeout, idleTimeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKO!O!dd:adopt", kwlist, &fd, &id,
                                     &ContextType, &context, &PyTuple_Type, &target,
                                     &connectTimeout, &idleTimeout))
        return NULL;
    struct sockaddr_storage address;
    socklen_t addressLength;
    if (parseTarget(target, &address, &addressLength) < 0)
        return NULL;
    if (checkReady(self) < 0)
        return NULL;
    if (context->set == NULL) {
        PyErr_SetString(PyExc_ValueError, "context not initialised");
        return NULL;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Conn *conn = calloc(1, sizeof *conn);
    if (conn == NULL)
        return PyErr_NoMemory();
    conn->entry.id = id;
    conn->clientFd = fd;
    conn->targetFd = -1;
    conn->state = HANDSHAKE;
    conn->set = context->set;
    conn->target = address;
    conn->targetLength = addressLength;
    conn->connectTimeout = connectTimeout;
    conn->deadline = engineCoarseNow() + connectTimeout;
    conn->idleTimeout = idleTimeout;
    /* Only this thread sets stopping: a stopped engine starts no thread. */
    if (self->stopping) {
        free(conn);
        PyErr_SetString(PyExc_RuntimeError, "engine stopped");
        return NULL;
    }
    /* The threads start with the first flow, so a process that forks
     * (twistd daemonising) before any connection forks single-threaded. */
    if (engineStartWorkers((EngineBase *)self, self->workers, sizeof(Worker),
                           self->workerCount, firstWorkerMain, engineMain) < 0) {
        free(conn);
        return NULL;
    }
    enum { ADOPTED, STOPPED, DUPLICATE, NO_MEMORY } outcome = ADOPTED;
    engineLock((EngineBase *)self);
    if (self->stopping)
        outcome = STOPPED;
    else if (connFind(self, id) != NULL)
        outcome = DUPLICATE;
    else if (reportReserve(&self->reports, REPORTS_PER_FLOW) < 0)
        outcome = NO_MEMORY;
    else if (idTableInsert(&self->flows, &conn->entry) < 0) {
        for (int i = 0; i < REPORTS_PER_FLOW; i++)
            reportRelease(&self->reports);
        outcome = NO_MEMORY;
    } else {
        atomic_fetch_add(&context->set->refs, 1);
        command(self, conn, CMD_ADOPT)->flowCount++;
    }
    pthread_mutex_unlock(&self->lock);
    if (outcome != ADOPTED) {
        free(conn);
        if (outcome == STOPPED)
            PyErr_SetString(PyExc_RuntimeError, "engine stopped");
        else if (outcome == NO_MEMORY)
            PyErr_NoMemory();
        else
            PyErr_SetString(PyExc_ValueError, "flow id already adopted");
        return NULL;
    }
    signalFd(workerOf(self, id)->base.wakeFd);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(close_doc,
             "close(flowId, reset=True) -> bool\n\n"
             "End a connection: with reset, both sockets reset (reason \"killed\");\n"
             "without, a close_notify and a FIN to the client.  False when the\n"
             "engine has no such flow.");

static PyObject *
TLSEngine_close(TLSEngine *self, PyObject *args)
{
    PyObject *idArg;
    uint64_t id;
    int reset = 1;
    if (!PyArg_ParseTuple(args, "O|p:close", &idArg, &reset) ||
        parseFlowId(idArg, &id) < 0 || checkReady(self) < 0)
        return NULL;
    engineLock((EngineBase *)self);
    Conn *conn = self->stopping ? NULL : connFind(self, id);
    Worker *w = NULL;
    if (conn != NULL)
        w = command(self, conn, reset ? CMD_KILL : CMD_CLOSE);
    pthread_mutex_unlock(&self->lock);
    if (conn == NULL)
        Py_RETURN_FALSE;
    signalFd(w->base.wakeFd);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(counters_doc,
             "counters(flowId) -> (bytesIn, bytesOut) or None\n\n"
             "Plaintext bytes from the client and to it so far; None when no such\n"
             "flow is live.");

static PyObject *
TLSEngine_counters(TLSEngine *self, PyObject *arg)
{
    uint64_t id;
    if (parseFlowId(arg, &id) < 0 || checkReady(self) < 0)
        return NULL;
    unsigned long long in = 0, out = 0;
    engineLock((EngineBase *)self);
    Conn *conn = connFind(self, id);
    if (conn != NULL) {
        in = atomic_load_explicit(&conn->bytesIn, memory_order_relaxed);
        out = atomic_load_explicit(&conn->bytesOut, memory_order_relaxed);
    }
    pthread_mutex_unlock(&self->lock);
    if (conn == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(KK)", in, out);
}

PyDoc_STRVAR(reports_doc,
             "reports() -> list\n\n"
             "What happened since the last call, oldest first, and clears the\n"
             "readiness of fileno(): (\"handshake\", flowId, serverName or None,\n"
             "clientSubject or None) and (\"ended\", flowId, bytesIn, bytesOut,\n"
             "reason).");

static PyObject *
TLSEngine_reports(TLSEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    /* Clear the eventfd before looking at the queue: a report posted after
     * this read signals it again, so none is left unread. */
    drainFd(self->notifyFd);
    const char *items;
    engineLock((EngineBase *)self);
    size_t count = reportsQueued(&self->reports, &items);
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; list != NULL && i < count; i++) {
        const Report *r = (const Report *)items + i;
        PyObject *item;
        if (r->kind == REPORT_HANDSHAKE)
            item = Py_BuildValue(
                "(sKzz)", "handshake", (unsigned long long)r->id,
                r->handshake.serverName[0] ? r->handshake.serverName : NULL,
                r->handshake.subject);
        else
            item = Py_BuildValue("(sKKKs)", "ended", (unsigned long long)r->id,
                                 r->end.bytesIn, r->end.bytesOut, r->end.reason);
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    if (list == NULL) {
        /* Out of memory: the reports stay queued; signal again so that
         * the next call has them. */
        signalFd(self->notifyFd);
        return NULL;
    }
    for (size_t i = 0; i < count; i++) {
        const Report *r = (const Report *)items + i;
        if (r->kind == REPORT_HANDSHAKE)
            free(r->handshake.subject);
    }
    engineLock((EngineBase *)self);
    reportsTaken(&self->reports, count);
    pthread_mutex_unlock(&self->lock);
    return list;
}

PyDoc_STRVAR(stop_doc,
             "stop()\n\n"
             "End every connection (reason \"proxy stopped\") and join the thread;\n"
             "their reports follow.  Later adopts raise RuntimeError.  Safe to call\n"
             "more than once.");

static PyObject *
TLSEngine_stop(TLSEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    engineLock((EngineBase *)self);
    self->stopping = 1;
    pthread_mutex_unlock(&self->lock);
    if (self->started && !self->joined) {
        engineJoinWorkers((EngineBase *)self, self->workers, sizeof(Worker),
                          self->workerCount);
        Py_DECREF(self);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(threadFlows_doc,
             "threadFlows() -> list of int\n\n"
             "Live connections per engine thread, one entry per thread: a flow\n"
             "belongs to thread flowId mod N, for its whole life.");

static PyObject *
TLSEngine_threadFlows(TLSEngine *self, PyObject *unused)
{
    if (checkReady(self) < 0)
        return NULL;
    PyObject *list = PyList_New(self->workerCount);
    if (list == NULL)
        return NULL;
    size_t counts[ENGINE_MAX_THREADS];
    engineLock((EngineBase *)self);
    for (int i = 0; i < self->workerCount; i++)
        counts[i] = self->workers[i].flowCount;
    pthread_mutex_unlock(&self->lock);
    for (int i = 0; i < self->workerCount; i++) {
        PyObject *count = PyLong_FromSize_t(counts[i]);
        if (count == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, count);
    }
    return list;
}

static PyMethodDef TLSEngine_methods[] = {
    {"adopt", (PyCFunction)(void (*)(void))TLSEngine_adopt, METH_VARARGS | METH_KEYWORDS,
     adopt_doc},
    {"close", (PyCFunction)TLSEngine_close, METH_VARARGS, close_doc},
    {"counters", (PyCFunction)TLSEngine_counters, METH_O, counters_doc},
    {"reports", (PyCFunction)TLSEngine_reports, METH_NOARGS, reports_doc},
    {"stop", (PyCFunction)TLSEngine_stop, METH_NOARGS, stop_doc},
    {"threadFlows", (PyCFunction)TLSEngine_threadFlows, METH_NOARGS, threadFlows_doc},
    ENGINE_COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

static PyMemberDef TLSEngine_members[] = {
    {"wakeFd", T_INT, offsetof(TLSEngine, wakeFd), READONLY,
     "the eventfd that wakes the thread"},
    {"notifyFd", T_INT, offsetof(TLSEngine, notifyFd), READONLY,
     "the eventfd by which the thread wakes the reactor"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(TLSEngine_doc,
             "TLSEngine(threads=0)\n\n"
             "The TLS termination engine: threads (0: one per CPU, at most 16) that\n"
             "run the handshakes of the clients adopted, dial their targets and\n"
             "relay between the two; a flow stays on thread flowId mod threads.");

static PyTypeObject TLSEngineType =
    ENGINE_TYPE(TLSEngine, "twistedproxy.tcp._tlsengine.TLSEngine", TLSEngine_doc);

static struct PyModuleDef moduleDefinition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedproxy.tcp._tlsengine",
    .m_doc = "The compiled TLS termination engine (see docs/tls.md).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__tlsengine(void)
{
    TLSEngineType.tp_members = TLSEngine_members;
    if (PyType_Ready(&ContextType) < 0)
        return NULL;
    PyObject *module = engineModule(&moduleDefinition, &TLSEngineType, "TLSEngine");
    if (module == NULL)
        return NULL;
    Py_INCREF(&ContextType);
    if (PyModule_AddObject(module, "Context", (PyObject *)&ContextType) < 0) {
        Py_DECREF(&ContextType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
