/*
 * twistedproxy._tlsengine: the compiled fast path of TLS termination
 * (docs/tls.md, "The fast path").
 *
 * Python accepts each client of a `tls:` listener and admits it as for
 * plain TCP, then hands the client's socket descriptor to this engine
 * (adopt), which runs the TLS handshake on it with OpenSSL (SSL_set_fd, no
 * memory BIOs) in its own thread, non-blocking, under epoll.  When the
 * handshake is done the engine reports it, with the client's server name
 * (SNI) and certificate subject; Python dials the target as for plain TCP
 * and gives the target's descriptor back (attach), and the engine relays:
 * SSL_read -> send(target), recv(target) -> SSL_write, through one bounded
 * buffer per direction, with TLS close_notify and TCP FIN mapped onto each
 * other (half-close).  When the connection ends the engine reports the
 * bytes each way and why.
 *
 * Threads: Python's calls (adopt, attach, close, counters, reports) run
 * in the reactor thread with the GIL; the engine thread never takes the
 * GIL.  They share two queues under one mutex, held only to link or
 * unlink: the commands (a connection with bits of what to do) and the
 * reports.  A connection's two reports live in its own struct, so a
 * report needs no memory at the moment it is made and can never be lost.
 * The engine thread never frees a connection: after its end report, it
 * forgets it, and Python frees it when it takes that report.
 *
 * The pieces an integrator may swap for a shared engine skeleton are in
 * their own functions: startThread (the thread), the id table (idTable*)
 * and the report queue (pushReports, Engine_reports).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_engine.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <signal.h>
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
    SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                  SSL_MODE_RELEASE_BUFFERS);
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
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twistedproxy._tlsengine.Context",
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
enum { CMD_ADOPT = 1, CMD_ATTACH = 2, CMD_CLOSE = 4, CMD_KILL = 8 };
enum { REPORT_HANDSHAKE, REPORT_END };

typedef struct Conn Conn;

typedef struct Report {
    struct Report *next;
    Conn *conn;
    int kind;
} Report;

typedef struct Buffer {
    char *data;
    size_t start, length;
} Buffer;

struct Conn {
    long long id;
    int clientFd, targetFd;
    SSL *ssl;
    ContextSet *set;
    int state;
    double idleTimeout, lastActive;
    /* The two reports, reserved with the connection. */
    Report handshakeReport, endReport;
    /* Shared with Python, under the engine's mutex. */
    unsigned commands;
    int queued, ended, orphan;
    int pendingTargetFd; /* given by attach, taken with its command */
    Conn *nextCommand;
    /* The engine thread's own. */
    Conn *prevLive, *nextLive, *nextDone;
    int done;
    uint32_t clientEvents, targetEvents;
    unsigned clientEof : 1, targetEof : 1, targetShut : 1, notifySent : 1;
    unsigned readWantsWrite : 1, writeWantsRead : 1, writeWantsWrite : 1,
        shutdownWantsWrite : 1, handshakeWantsWrite : 1;
    Buffer toTarget, toClient;
    const char *finishedFirst;
    _Atomic unsigned long long bytesIn, bytesOut;
    /* Filled by the engine before the report that carries them. */
    char serverName[256];
    char *subject;
    char reason[200];
};

static void
freeConn(Conn *conn)
{
    free(conn->subject);
    free(conn);
}

typedef struct {
    PyObject_HEAD
    int epfd, wakeFd, notifyFd;
    pthread_t thread;
    int started;
    atomic_int stopping;
    int stopped;
    pthread_mutex_t lock;
    Conn *commandHead, *commandTail;
    Report *reportHead, *reportTail;
    PyObject *ids; /* the id table: id -> the Conn's address */
    /* The engine thread's own. */
    Conn *live;
    Conn *doneList;
    Report *pendingHead, *pendingTail;
    double now;
} Engine;

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* -- the report queue ------------------------------------------------------- */

/* Queue a report in the engine thread; pushReports hands the batch over. */
static void
queueReport(Engine *e, Report *report)
{
    report->next = NULL;
    if (e->pendingTail != NULL)
        e->pendingTail->next = report;
    else
        e->pendingHead = report;
    e->pendingTail = report;
}

/* Hand the reports of one batch of events to Python, and wake it. */
static void
pushReports(Engine *e)
{
    if (e->pendingHead == NULL)
        return;
    pthread_mutex_lock(&e->lock);
    for (Report *r = e->pendingHead; r != NULL; r = r->next)
        if (r->kind == REPORT_END)
            r->conn->ended = 1;
    if (e->reportTail != NULL)
        e->reportTail->next = e->pendingHead;
    else
        e->reportHead = e->pendingHead;
    e->reportTail = e->pendingTail;
    pthread_mutex_unlock(&e->lock);
    e->pendingHead = e->pendingTail = NULL;
    signalFd(e->notifyFd);
}

/* -- the engine thread: epoll --------------------------------------------- */

/* A socket's events when it is not in the epoll set. */
#define UNWATCHED 0xffffffffu

static void endConn(Engine *e, Conn *conn, const char *reason, int resetClient,
                    int resetTarget);

/* Watch one side of a connection for `events`; none takes the socket out
 * of the set, since epoll reports a hang-up whatever is asked, and a
 * side that is done both ways would keep waking the thread. */
static void
watch(Engine *e, Conn *conn, int side, uint32_t events)
{
    uint32_t *current = side ? &conn->targetEvents : &conn->clientEvents;
    if (conn->done || *current == events || (events == 0 && *current == UNWATCHED))
        return;
    int fd = side ? conn->targetFd : conn->clientFd;
    if (events == 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
        *current = UNWATCHED;
        return;
    }
    struct epoll_event ev = {.events = events,
                             .data.ptr = (void *)((uintptr_t)conn | (uintptr_t)side)};
    if (epoll_ctl(e->epfd, *current == UNWATCHED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev) <
        0) {
        endConn(e, conn, "tls engine could not watch the sockets", 1, 1);
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

/* End a connection: close both sockets (with a reset where asked), free
 * its TLS state and queue its end report. */
static void
endConn(Engine *e, Conn *conn, const char *reason, int resetClient, int resetTarget)
{
    if (conn->done)
        return;
    conn->done = 1;
    snprintf(conn->reason, sizeof conn->reason, "%s", reason);
    if (conn->clientFd >= 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, conn->clientFd, NULL);
        if (resetClient)
            closeWithReset(conn->clientFd);
        else
            close(conn->clientFd);
        conn->clientFd = -1;
    }
    if (conn->targetFd >= 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, conn->targetFd, NULL);
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
    else if (e->live == conn)
        e->live = conn->nextLive;
    if (conn->nextLive != NULL)
        conn->nextLive->prevLive = conn->prevLive;
    conn->prevLive = conn->nextLive = NULL;
    conn->endReport.conn = conn;
    conn->endReport.kind = REPORT_END;
    queueReport(e, &conn->endReport);
}

/* Why the last TLS call failed, in OpenSSL's words ("tls: ..."). */
static void
tlsFailure(Conn *conn, int error, char *out, size_t size)
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

static void
peerSubject(Conn *conn)
{
    X509 *peer = SSL_get0_peer_certificate(conn->ssl);
    if (peer == NULL)
        return;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL)
        return;
    /* RFC 4514 text as cryptography's rfc4514_string writes it. */
    X509_NAME_print_ex(bio, X509_get_subject_name(peer), 0,
                       XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
    char *text;
    long length = BIO_get_mem_data(bio, &text);
    conn->subject = malloc((size_t)length + 1);
    if (conn->subject != NULL) {
        memcpy(conn->subject, text, (size_t)length);
        conn->subject[length] = '\0';
    }
    BIO_free(bio);
}

static void
handshake(Engine *e, Conn *conn)
{
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(conn->ssl);
    if (r == 1) {
        const char *name = SSL_get_servername(conn->ssl, TLSEXT_NAMETYPE_host_name);
        if (name != NULL)
            snprintf(conn->serverName, sizeof conn->serverName, "%s", name);
        peerSubject(conn);
        conn->state = DIALING;
        /* Nothing more from the client until the target answers. */
        watch(e, conn, 0, 0);
        conn->handshakeReport.conn = conn;
        conn->handshakeReport.kind = REPORT_HANDSHAKE;
        queueReport(e, &conn->handshakeReport);
        return;
    }
    int error = SSL_get_error(conn->ssl, r);
    char reason[sizeof conn->reason];
    switch (error) {
    case SSL_ERROR_WANT_READ:
        watch(e, conn, 0, EPOLLIN);
        return;
    case SSL_ERROR_WANT_WRITE:
        watch(e, conn, 0, EPOLLOUT);
        return;
    case SSL_ERROR_ZERO_RETURN:
        endConn(e, conn, "client closed", 0, 0);
        return;
    case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() == 0) {
            endConn(e, conn, errno == 0 ? "client closed" : "reset by client", 0, 0);
            return;
        }
        /* fall through */
    default:
        tlsFailure(conn, error, reason, sizeof reason);
        endConn(e, conn, reason, 0, 0);
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
pump(Engine *e, Conn *conn)
{
    Buffer *up = &conn->toTarget, *down = &conn->toClient;
    int moved = 0;
    for (;;) {
        int progress = 0;
        /* client -> buffer */
        if (!conn->clientEof && space(up) > 0) {
            if (!ready(up)) {
                endConn(e, conn, "out of memory", 1, 1);
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
                    char reason[sizeof conn->reason];
                    if (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
                        snprintf(reason, sizeof reason, "reset by client");
                    else
                        tlsFailure(conn, error, reason, sizeof reason);
                    endConn(e, conn, reason, 1, 1);
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
                endConn(e, conn, "reset by target", 1, 1);
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
                endConn(e, conn, "out of memory", 1, 1);
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
                endConn(e, conn, "reset by target", 1, 1);
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
                    endConn(e, conn, "reset by client", 1, 1);
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
        conn->lastActive = e->now;
    if (conn->clientEof && conn->targetShut && conn->notifySent) {
        endConn(e, conn, conn->finishedFirst ? conn->finishedFirst : "closed", 0, 0);
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
    watch(e, conn, 0, client);
    watch(e, conn, 1, target);
}

/* -- commands -------------------------------------------------------------- */

static void
startConn(Engine *e, Conn *conn)
{
    conn->ssl = SSL_new(conn->set->defaultContext);
    conn->clientEvents = conn->targetEvents = UNWATCHED;
    conn->nextLive = e->live;
    if (e->live != NULL)
        e->live->prevLive = conn;
    e->live = conn;
    if (conn->ssl == NULL || SSL_set_fd(conn->ssl, conn->clientFd) != 1) {
        ERR_clear_error();
        endConn(e, conn, "tls engine could not take the connection", 1, 0);
        return;
    }
    SSL_set_accept_state(conn->ssl);
    handshake(e, conn);
}

static void
attachTarget(Engine *e, Conn *conn)
{
    conn->state = RELAYING;
    conn->lastActive = e->now;
    /* What OpenSSL read with the end of the handshake is in its buffer. */
    pump(e, conn);
}

/* A graceful close (a failed dial): close_notify, then the FIN. */
static void
closeGracefully(Engine *e, Conn *conn)
{
    if (conn->state != HANDSHAKE) {
        ERR_clear_error();
        SSL_shutdown(conn->ssl);
        ERR_clear_error();
    }
    if (conn->clientFd >= 0)
        shutdown(conn->clientFd, SHUT_WR);
    endConn(e, conn, "closed", 0, 1);
}

static void
runCommands(Engine *e)
{
    for (;;) {
        pthread_mutex_lock(&e->lock);
        Conn *conn = e->commandHead;
        if (conn == NULL) {
            pthread_mutex_unlock(&e->lock);
            return;
        }
        e->commandHead = conn->nextCommand;
        if (e->commandHead == NULL)
            e->commandTail = NULL;
        unsigned commands = conn->commands;
        conn->commands = 0;
        conn->queued = 0;
        int gone = conn->ended, orphan = conn->orphan;
        int targetFd = conn->pendingTargetFd;
        conn->pendingTargetFd = -1;
        pthread_mutex_unlock(&e->lock);
        if (orphan) {
            freeConn(conn);
            gone = 1;
        } else if (!gone && !conn->done) {
            if (commands & CMD_ADOPT)
                startConn(e, conn);
            if (commands & CMD_KILL)
                endConn(e, conn, "killed", 1, 1);
            else if (commands & CMD_CLOSE)
                closeGracefully(e, conn);
            else if (targetFd >= 0 && conn->state == DIALING && !conn->done) {
                conn->targetFd = targetFd;
                targetFd = -1;
                attachTarget(e, conn);
            }
        }
        /* A target given to a connection that ended meanwhile. */
        if (targetFd >= 0)
            closeWithReset(targetFd);
    }
}

static void
scanIdle(Engine *e)
{
    Conn *next;
    for (Conn *conn = e->live; conn != NULL; conn = next) {
        next = conn->nextLive;
        if (conn->state == RELAYING && conn->idleTimeout > 0 &&
            e->now - conn->lastActive >= conn->idleTimeout)
            endConn(e, conn, "idle timeout", 1, 1);
    }
}

static void *
engineMain(void *arg)
{
    Engine *e = arg;
    struct epoll_event events[EVENTS_PER_WAIT];
    double lastScan = monotonic();
    while (!atomic_load(&e->stopping)) {
        int n = epoll_wait(e->epfd, events, EVENTS_PER_WAIT, IDLE_SCAN_MS);
        e->now = monotonic();
        for (int i = 0; i < n; i++) {
            uintptr_t data = (uintptr_t)events[i].data.ptr;
            if (data == 0) {
                drainFd(e->wakeFd);
                runCommands(e);
                continue;
            }
            Conn *conn = (Conn *)(data & ~(uintptr_t)1);
            if (conn->done)
                continue;
            if (conn->state == HANDSHAKE)
                handshake(e, conn);
            else if (conn->state == RELAYING)
                pump(e, conn);
        }
        if (e->now - lastScan >= IDLE_SCAN_MS / 1000.0) {
            lastScan = e->now;
            scanIdle(e);
        }
        pushReports(e);
    }
    runCommands(e);
    while (e->live != NULL)
        endConn(e, e->live, "proxy stopped", 0, 0);
    pushReports(e);
    return NULL;
}

/* Start the engine thread, with every signal blocked (they are the
 * reactor's) and a small stack. */
static int
startThread(Engine *e)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int rc = pthread_create(&e->thread, &attr, engineMain, e);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->started = 1;
    return 0;
}

/* -- the id table (reactor thread, with the GIL) ------------------------------ */

static Conn *
idTableFind(Engine *e, PyObject *id)
{
    PyObject *address = PyDict_GetItemWithError(e->ids, id);
    if (address == NULL)
        return NULL;
    return PyLong_AsVoidPtr(address);
}

static int
idTableAdd(Engine *e, long long id, Conn *conn)
{
    PyObject *key = PyLong_FromLongLong(id), *value = PyLong_FromVoidPtr(conn);
    int r = (key == NULL || value == NULL) ? -1 : PyDict_SetItem(e->ids, key, value);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return r;
}

static void
idTableRemove(Engine *e, long long id)
{
    PyObject *key = PyLong_FromLongLong(id);
    if (key == NULL || PyDict_DelItem(e->ids, key) < 0)
        PyErr_Clear();
    Py_XDECREF(key);
}

/* Queue commands for a connection (reactor thread). */
static void
command(Engine *e, Conn *conn, unsigned commands)
{
    pthread_mutex_lock(&e->lock);
    conn->commands |= commands;
    if (!conn->queued) {
        conn->queued = 1;
        conn->nextCommand = NULL;
        if (e->commandTail != NULL)
            e->commandTail->nextCommand = conn;
        else
            e->commandHead = conn;
        e->commandTail = conn;
    }
    pthread_mutex_unlock(&e->lock);
    signalFd(e->wakeFd);
}

/* -- the Python type --------------------------------------------------------- */

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = self->wakeFd = self->notifyFd = -1;
    pthread_mutex_init(&self->lock, NULL);
    self->ids = PyDict_New();
    if (self->ids == NULL ||
        openEngineDescriptors(&self->epfd, &self->wakeFd, &self->notifyFd,
                              (epoll_data_t){.ptr = NULL}) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
freeReports(Engine *self)
{
    Report *r = self->reportHead;
    self->reportHead = self->reportTail = NULL;
    while (r != NULL) {
        Report *next = r->next;
        if (r->kind == REPORT_END)
            freeConn(r->conn);
        r = next;
    }
}

static void
stopEngine(Engine *self)
{
    if (self->stopped)
        return;
    self->stopped = 1;
    if (self->started) {
        atomic_store(&self->stopping, 1);
        signalFd(self->wakeFd);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
    }
}

static void
Engine_dealloc(Engine *self)
{
    stopEngine(self);
    /* Every connection has ended (the thread ended them); those whose end
     * Python did not take are freed here. */
    freeReports(self);
    Py_CLEAR(self->ids);
    if (self->epfd >= 0)
        close(self->epfd);
    if (self->wakeFd >= 0)
        close(self->wakeFd);
    if (self->notifyFd >= 0)
        close(self->notifyFd);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(adopt_doc,
             "adopt(fd, flowId, context)\n\n"
             "Take a client's connected socket and run the TLS handshake on it with\n"
             "context (a Context).  The engine owns fd from now on; reports() says\n"
             "when the handshake is done, and when the connection ended.");

static PyObject *
Engine_adopt(Engine *self, PyObject *args)
{
    int fd;
    long long id;
    Context *context;
    if (!PyArg_ParseTuple(args, "iLO!", &fd, &id, &ContextType, &context))
        return NULL;
    if (self->stopped) {
        PyErr_SetString(PyExc_RuntimeError, "engine stopped");
        return NULL;
    }
    if (context->set == NULL) {
        PyErr_SetString(PyExc_ValueError, "context not initialised");
        return NULL;
    }
    PyObject *key = PyLong_FromLongLong(id);
    if (key == NULL)
        return NULL;
    int known = PyDict_Contains(self->ids, key);
    Py_DECREF(key);
    if (known != 0) {
        if (known > 0)
            PyErr_SetString(PyExc_ValueError, "flow id already adopted");
        return NULL;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Conn *conn = calloc(1, sizeof *conn);
    if (conn == NULL)
        return PyErr_NoMemory();
    conn->id = id;
    conn->clientFd = fd;
    conn->targetFd = -1;
    conn->pendingTargetFd = -1;
    conn->state = HANDSHAKE;
    if (idTableAdd(self, id, conn) < 0) {
        free(conn);
        return NULL;
    }
    if (!self->started && startThread(self) < 0) {
        idTableRemove(self, id);
        free(conn);
        return NULL;
    }
    atomic_fetch_add(&context->set->refs, 1);
    conn->set = context->set;
    command(self, conn, CMD_ADOPT);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attach_doc,
             "attach(flowId, targetFd, idleTimeout) -> bool\n\n"
             "Give a connection whose handshake is done its target's connected\n"
             "socket, and relay; the engine owns targetFd from now on.  False\n"
             "(targetFd still the caller's) when the flow is not there any more.");

static PyObject *
Engine_attach(Engine *self, PyObject *args)
{
    PyObject *id;
    int fd;
    double idle;
    if (!PyArg_ParseTuple(args, "Oid", &id, &fd, &idle))
        return NULL;
    Conn *conn = idTableFind(self, id);
    if (conn == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    pthread_mutex_lock(&self->lock);
    int taken = !conn->ended && conn->pendingTargetFd < 0;
    if (taken) {
        conn->pendingTargetFd = fd;
        conn->idleTimeout = idle;
    }
    pthread_mutex_unlock(&self->lock);
    if (!taken)
        Py_RETURN_FALSE;
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    command(self, conn, CMD_ATTACH);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(close_doc,
             "close(flowId, reset=True) -> bool\n\n"
             "End a connection: with reset, both sockets reset (reason \"killed\");\n"
             "without, a close_notify and a FIN to the client.  False when the\n"
             "engine has no such flow.");

static PyObject *
Engine_close(Engine *self, PyObject *args)
{
    PyObject *id;
    int reset = 1;
    if (!PyArg_ParseTuple(args, "O|p", &id, &reset))
        return NULL;
    Conn *conn = idTableFind(self, id);
    if (conn == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    command(self, conn, reset ? CMD_KILL : CMD_CLOSE);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(counters_doc, "counters(flowId) -> (bytesIn, bytesOut) or None");

static PyObject *
Engine_counters(Engine *self, PyObject *id)
{
    Conn *conn = idTableFind(self, id);
    if (conn == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_BuildValue("KK", atomic_load_explicit(&conn->bytesIn, memory_order_relaxed),
                         atomic_load_explicit(&conn->bytesOut, memory_order_relaxed));
}

PyDoc_STRVAR(reports_doc,
             "reports() -> list\n\n"
             "What happened since the last call, in order: (\"handshake\", flowId,\n"
             "serverName or None, clientSubject or None) and (\"ended\", flowId,\n"
             "bytesIn, bytesOut, reason).");

static PyObject *
Engine_reports(Engine *self, PyObject *unused)
{
    drainFd(self->notifyFd);
    pthread_mutex_lock(&self->lock);
    Report *r = self->reportHead;
    self->reportHead = self->reportTail = NULL;
    /* A connection still in the command queue is freed by the engine when
     * it takes it from there. */
    for (Report *q = r; q != NULL; q = q->next)
        if (q->kind == REPORT_END && q->conn->queued)
            q->conn->orphan = 1;
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New(0);
    while (r != NULL) {
        Report *next = r->next;
        Conn *conn = r->conn;
        PyObject *item = NULL;
        if (list != NULL) {
            if (r->kind == REPORT_HANDSHAKE)
                item = Py_BuildValue("sLzz", "handshake", conn->id,
                                     conn->serverName[0] ? conn->serverName : NULL,
                                     conn->subject);
            else
                item = Py_BuildValue("sLKKs", "ended", conn->id,
                                     atomic_load(&conn->bytesIn),
                                     atomic_load(&conn->bytesOut), conn->reason);
            if (item == NULL || PyList_Append(list, item) < 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        if (r->kind == REPORT_END) {
            idTableRemove(self, conn->id);
            /* An orphan is still in the command queue: the engine frees it. */
            if (!conn->orphan)
                freeConn(conn);
        }
        r = next;
    }
    return list;
}

PyDoc_STRVAR(flowCount_doc, "flowCount() -> the connections whose end was not reported");

static PyObject *
Engine_flowCount(Engine *self, PyObject *unused)
{
    return PyLong_FromSsize_t(PyDict_Size(self->ids));
}

PyDoc_STRVAR(fileno_doc, "fileno() -> the eventfd that is readable when reports() has some");

static PyObject *
Engine_fileno(Engine *self, PyObject *unused)
{
    return PyLong_FromLong(self->notifyFd);
}

PyDoc_STRVAR(stop_doc,
             "stop()\n\n"
             "End every connection (reason \"proxy stopped\") and join the thread;\n"
             "their reports follow.  Later adopts raise RuntimeError.");

static PyObject *
Engine_stop(Engine *self, PyObject *unused)
{
    stopEngine(self);
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"adopt", (PyCFunction)Engine_adopt, METH_VARARGS, adopt_doc},
    {"attach", (PyCFunction)Engine_attach, METH_VARARGS, attach_doc},
    {"close", (PyCFunction)Engine_close, METH_VARARGS, close_doc},
    {"counters", (PyCFunction)Engine_counters, METH_O, counters_doc},
    {"reports", (PyCFunction)Engine_reports, METH_NOARGS, reports_doc},
    {"flowCount", (PyCFunction)Engine_flowCount, METH_NOARGS, flowCount_doc},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, fileno_doc},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, stop_doc},
    {NULL},
};

static PyMemberDef Engine_members[] = {
    {"wakeFd", T_INT, offsetof(Engine, wakeFd), READONLY, "the eventfd that wakes the thread"},
    {"notifyFd", T_INT, offsetof(Engine, notifyFd), READONLY,
     "the eventfd by which the thread wakes the reactor"},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "twistedproxy._tlsengine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The TLS termination engine: one thread, handshakes and relays.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
};

static struct PyModuleDef moduleDef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "twistedproxy._tlsengine",
    .m_doc = "The compiled TLS termination engine (see docs/tls.md).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__tlsengine(void)
{
    if (PyType_Ready(&ContextType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&moduleDef);
    if (module == NULL)
        return NULL;
    Py_INCREF(&ContextType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(module, "Context", (PyObject *)&ContextType) < 0 ||
        PyModule_AddObject(module, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
