/*
 * portproxy-docker-proxy: what dockerd runs as its userland proxy
 * ("userland-proxy-path" in daemon.json), once per published port.
 *
 * It takes docker-proxy's command line:
 *
 *     -proto tcp|udp|sctp -host-ip IP -host-port N
 *     -container-ip IP -container-port N [-use-listen-fd]
 *
 * asks the running portproxy daemon, over its control socket
 * ($PORTPROXY_CONTROL, else /run/portproxy/control.sock), to publish that
 * mapping (passing the socket dockerd bound on descriptor 4 along when
 * -use-listen-fd is given), and reports to dockerd on descriptor 3 as
 * docker-proxy does: "0\n" when the port is published, "1\n" and the
 * reason when it is not.  Then it waits.  Its connection to the daemon is
 * the mapping's lease: on SIGINT or SIGTERM it unpublishes the mapping
 * and exits; if it dies, the daemon drops the mapping; if the daemon goes
 * away, it connects again and publishes the mapping again as soon as the
 * daemon is back.
 *
 * The daemon speaks AMP (twisted.protocols.amp); this file writes and
 * reads AMP boxes itself: pairs of a 16-bit big-endian length and that
 * many bytes (key, value, key, value, ...), ended by a zero length.
 * docs/docker.md describes the exchange.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef PORTPROXY_VERSION
#define PORTPROXY_VERSION "unknown"
#endif

#define DEFAULT_CONTROL "/run/portproxy/control.sock"
#define REPORT_FD 3 /* dockerd's pipe for "0\n" or "1\n<error>" */
#define LISTEN_FD 4 /* dockerd's bound socket, with -use-listen-fd */

/* How long dockerd itself waits for the report is 16 s. */
#define ANSWER_TIMEOUT_MS 15000
/* How long to wait for the daemon to confirm an unpublish at exit. */
#define UNPUBLISH_TIMEOUT_MS 3000
/* Reconnecting after the daemon went away: first and longest pause. */
#define RETRY_FIRST_MS 50
#define RETRY_MAX_MS 400
/* After the daemon answered with a refusal, try again this rarely. */
#define RETRY_REFUSED_MS 5000

#define BOX_MAX 8192
#define TEXT_MAX 1024

struct options {
    const char *proto;
    const char *hostIP;
    const char *hostPort;
    const char *containerIP;
    const char *containerPort;
    int useListenFd;
};

/* What came of one attempt to publish. */
enum outcome {
    PUBLISHED,
    UNREACHABLE, /* no daemon to talk to: try again later */
    REFUSED,     /* the daemon said no: the text says why */
    STOPPED,     /* SIGINT or SIGTERM arrived meanwhile */
};

static int signals = -1; /* signalfd for SIGINT and SIGTERM */
static int control = -1; /* the connection to the daemon: the lease */
static char name[TEXT_MAX]; /* the mapping's name, as the daemon gave it */
static char problem[TEXT_MAX];

static void say(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(problem, sizeof(problem), format, args);
    va_end(args);
}

static long long nowMs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* -- docker-proxy's command line (Go's flag package rules) ------------- */

static int parseBool(const char *text, int *value)
{
    static const char *yes[] = {"1", "t", "T", "true", "TRUE", "True"};
    static const char *no[] = {"0", "f", "F", "false", "FALSE", "False"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(*yes); i++) {
        if (strcmp(text, yes[i]) == 0) {
            *value = 1;
            return 0;
        }
        if (strcmp(text, no[i]) == 0) {
            *value = 0;
            return 0;
        }
    }
    return -1;
}

static int parseArguments(int argc, char **argv, struct options *o, int *version)
{
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (arg[0] != '-' || arg[1] == '\0')
            break; /* the first non-flag argument ends the flags */
        arg++;
        if (arg[0] == '-') {
            arg++;
            if (arg[0] == '\0')
                break; /* "--" */
        }
        char flag[64];
        const char *value = NULL;
        const char *equals = strchr(arg, '=');
        size_t length = equals ? (size_t)(equals - arg) : strlen(arg);
        if (length == 0 || length >= sizeof(flag) || arg[0] == '=') {
            say("bad flag syntax: %s", argv[i]);
            return -1;
        }
        memcpy(flag, arg, length);
        flag[length] = '\0';
        if (equals)
            value = equals + 1;

        int *boolean = NULL;
        const char **text = NULL;
        if (strcmp(flag, "use-listen-fd") == 0)
            boolean = &o->useListenFd;
        else if (strcmp(flag, "v") == 0 || strcmp(flag, "version") == 0)
            boolean = version;
        else if (strcmp(flag, "proto") == 0)
            text = &o->proto;
        else if (strcmp(flag, "host-ip") == 0)
            text = &o->hostIP;
        else if (strcmp(flag, "host-port") == 0)
            text = &o->hostPort;
        else if (strcmp(flag, "container-ip") == 0)
            text = &o->containerIP;
        else if (strcmp(flag, "container-port") == 0)
            text = &o->containerPort;
        else {
            say("flag provided but not defined: -%s", flag);
            return -1;
        }
        if (boolean) {
            if (value == NULL)
                *boolean = 1;
            else if (parseBool(value, boolean) < 0) {
                say("invalid boolean value \"%s\" for -%s", value, flag);
                return -1;
            }
            continue;
        }
        if (value == NULL) {
            if (i + 1 >= argc) {
                say("flag needs an argument: -%s", flag);
                return -1;
            }
            value = argv[++i];
        }
        *text = value;
    }
    return 0;
}

static int isPort(const char *text)
{
    char *end;
    errno = 0;
    long port = strtol(text, &end, 10);
    return *text != '\0' && *end == '\0' && errno == 0 && port >= 1 && port <= 65535;
}

/* -- AMP boxes ------------------------------------------------------------ */

struct box {
    unsigned char data[BOX_MAX];
    size_t length;
};

static int put(struct box *b, const char *key, const char *value)
{
    size_t k = strlen(key), v = strlen(value);
    if (b->length + 4 + k + v + 2 > sizeof(b->data) || v > 0xffff)
        return -1;
    b->data[b->length++] = 0;
    b->data[b->length++] = (unsigned char)k;
    memcpy(b->data + b->length, key, k);
    b->length += k;
    b->data[b->length++] = (unsigned char)(v >> 8);
    b->data[b->length++] = (unsigned char)(v & 0xff);
    memcpy(b->data + b->length, value, v);
    b->length += v;
    return 0;
}

static void end(struct box *b)
{
    b->data[b->length++] = 0;
    b->data[b->length++] = 0;
}

/* Send a box, with descriptor fd in SCM_RIGHTS when fd >= 0. */
static int sendBox(const struct box *b, int fd)
{
    size_t sent = 0;
    while (sent < b->length) {
        struct iovec io = {(void *)(b->data + sent), b->length - sent};
        union {
            char buffer[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ancillary;
        struct msghdr message = {.msg_iov = &io, .msg_iovlen = 1};
        if (fd >= 0 && sent == 0) {
            memset(&ancillary, 0, sizeof(ancillary));
            message.msg_control = ancillary.buffer;
            message.msg_controllen = sizeof(ancillary.buffer);
            struct cmsghdr *c = CMSG_FIRSTHDR(&message);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), &fd, sizeof(int));
        }
        ssize_t n = sendmsg(control, &message, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd p = {control, POLLOUT, 0};
                poll(&p, 1, 100);
                continue;
            }
            return -1;
        }
        sent += (size_t)n;
    }
    return 0;
}

/*
 * Read the daemon's answer to the command asked as "tag": PUBLISHED (with
 * the "name" value copied to name when there is one), REFUSED (problem
 * holds the daemon's text), UNREACHABLE (the connection broke or timed
 * out) or STOPPED.
 */
static enum outcome readAnswer(const char *tag, int timeoutMs, int stopOnSignal)
{
    static unsigned char in[BOX_MAX];
    size_t have = 0;
    long long deadline = nowMs() + timeoutMs;
    for (;;) {
        /* Parse what is there: is the box complete? */
        size_t at = 0;
        int complete = 0, answer = 0, error = 0, ours = 0;
        char key[256], text[TEXT_MAX] = "", got[TEXT_MAX] = "";
        while (at + 2 <= have) {
            size_t k = ((size_t)in[at] << 8) | in[at + 1];
            if (k == 0) {
                complete = 1;
                break;
            }
            if (at + 2 + k + 2 > have)
                break;
            memcpy(key, in + at + 2, k);
            key[k] = '\0';
            size_t v = ((size_t)in[at + 2 + k] << 8) | in[at + 3 + k];
            if (at + 4 + k + v > have)
                break;
            const char *value = (const char *)in + at + 4 + k;
            size_t copy = v < TEXT_MAX - 1 ? v : TEXT_MAX - 1;
            if (strcmp(key, "_answer") == 0 || strcmp(key, "_error") == 0) {
                answer |= key[1] == 'a';
                error |= key[1] == 'e';
                ours = v == strlen(tag) && memcmp(value, tag, v) == 0;
            } else if (strcmp(key, "_error_description") == 0) {
                memcpy(text, value, copy);
                text[copy] = '\0';
            } else if (strcmp(key, "name") == 0) {
                memcpy(got, value, copy);
                got[copy] = '\0';
            }
            at += 4 + k + v;
        }
        if (complete) {
            if (ours && answer) {
                if (got[0])
                    snprintf(name, sizeof(name), "%s", got);
                return PUBLISHED;
            }
            if (ours && error) {
                say("%s", text[0] ? text : "the portproxy daemon refused");
                return REFUSED;
            }
            /* Not for us (nothing else is asked): skip it. */
            memmove(in, in + at + 2, have - at - 2);
            have -= at + 2;
            continue;
        }
        if (have == sizeof(in)) {
            say("the portproxy daemon's answer is too long");
            return UNREACHABLE;
        }

        int wait = (int)(deadline - nowMs());
        if (wait <= 0) {
            say("no answer from the portproxy daemon in %d s", timeoutMs / 1000);
            return UNREACHABLE;
        }
        struct pollfd p[2] = {{control, POLLIN, 0}, {signals, POLLIN, 0}};
        int n = poll(p, stopOnSignal ? 2 : 1, wait);
        if (n < 0 && errno != EINTR) {
            say("poll: %s", strerror(errno));
            return UNREACHABLE;
        }
        if (stopOnSignal && (p[1].revents & POLLIN))
            return STOPPED;
        if (n > 0 && p[0].revents) {
            ssize_t r = read(control, in + have, sizeof(in) - have);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                say("the portproxy daemon closed the connection");
                return UNREACHABLE;
            }
            if (r > 0)
                have += (size_t)r;
        }
    }
}

/* -- the control connection ------------------------------------------- */

static const char *controlPath(void)
{
    const char *path = getenv("PORTPROXY_CONTROL");
    return path && *path ? path : DEFAULT_CONTROL;
}

static void disconnect(void)
{
    if (control >= 0)
        close(control);
    control = -1;
}

/* Connect to the daemon and ask it to publish the mapping. */
static enum outcome publish(const struct options *o, int listenFd, int stopOnSignal)
{
    const char *path = controlPath();
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(address.sun_path)) {
        say("the control socket path %s is too long", path);
        return REFUSED;
    }
    strcpy(address.sun_path, path);
    control = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (control < 0) {
        say("socket: %s", strerror(errno));
        return UNREACHABLE;
    }
    if (connect(control, (struct sockaddr *)&address, sizeof(address)) < 0) {
        int e = errno;
        disconnect();
        if (e == EAGAIN)
            say("the portproxy daemon at %s is busy", path);
        else
            say("cannot reach the portproxy daemon at %s: %s (is portproxy running, with a"
                " control: section in its map?)",
                path, strerror(e));
        return UNREACHABLE;
    }
    struct box b = {.length = 0};
    put(&b, "_command", "Publish");
    put(&b, "_ask", "1");
    int fits = put(&b, "proto", o->proto) == 0 && put(&b, "host_ip", o->hostIP) == 0 &&
               put(&b, "host_port", o->hostPort) == 0 &&
               put(&b, "container_ip", o->containerIP) == 0 &&
               put(&b, "container_port", o->containerPort) == 0 &&
               (listenFd < 0 || put(&b, "listen_fd", "0") == 0);
    if (!fits) {
        disconnect();
        say("the arguments are too long");
        return REFUSED;
    }
    end(&b);
    if (sendBox(&b, listenFd) < 0) {
        say("cannot talk to the portproxy daemon at %s: %s", path, strerror(errno));
        disconnect();
        return UNREACHABLE;
    }
    enum outcome result = readAnswer("1", ANSWER_TIMEOUT_MS, stopOnSignal);
    if (result != PUBLISHED)
        disconnect();
    return result;
}

/* Unpublish (so the port is free when dockerd sees this process end). */
static void unpublish(void)
{
    if (control < 0 || !name[0])
        return;
    struct box b = {.length = 0};
    put(&b, "_command", "Unpublish");
    put(&b, "_ask", "2");
    put(&b, "name", name);
    end(&b);
    if (sendBox(&b, -1) == 0)
        readAnswer("2", UNPUBLISH_TIMEOUT_MS, 0);
    disconnect();
}

/* Sleep up to ms, jittered by a quarter so shims spread; 1 if a signal came. */
static int pause_(int ms)
{
    int jitter = ms / 4 > 0 ? rand() % (ms / 2 + 1) - ms / 4 : 0;
    struct pollfd p = {signals, POLLIN, 0};
    return poll(&p, 1, ms + jitter) > 0;
}

/* Wait for a signal, or for the daemon to go away (then return 0). */
static int holdLease(void)
{
    for (;;) {
        struct pollfd p[2] = {{signals, POLLIN, 0}, {control, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        if (p[0].revents & POLLIN)
            return 1;
        if (p[1].revents) {
            char buffer[512];
            ssize_t r = read(control, buffer, sizeof(buffer));
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                disconnect();
                return 0;
            }
        }
    }
}

static void report(int ok)
{
    char text[TEXT_MAX + 4];
    int length = ok ? snprintf(text, sizeof(text), "0\n")
                    : snprintf(text, sizeof(text), "1\n%s", problem);
    if (fcntl(REPORT_FD, F_GETFD) < 0) {
        /* Run by hand, not by dockerd: say it on standard error. */
        if (!ok)
            fprintf(stderr, "portproxy-docker-proxy: %s\n", problem);
        return;
    }
    if (write(REPORT_FD, text, (size_t)length) < 0 && !ok)
        fprintf(stderr, "portproxy-docker-proxy: %s\n", problem);
    close(REPORT_FD);
}

int main(int argc, char **argv)
{
    struct options o = {"tcp", "0.0.0.0", "-1", "0.0.0.0", "-1", 0};
    int version = 0;
    fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC);
    if (parseArguments(argc, argv, &o, &version) < 0) {
        report(0);
        return 2;
    }
    if (version) {
        printf("portproxy-docker-proxy (portproxy %s), a docker-proxy drop-in\n",
               PORTPROXY_VERSION);
        return 0;
    }
    int listenFd = -1;
    if (o.useListenFd) {
        if (fcntl(LISTEN_FD, F_SETFD, FD_CLOEXEC) < 0) {
            say("-use-listen-fd was given but descriptor %d is not open", LISTEN_FD);
            report(0);
            return 1;
        }
        listenFd = LISTEN_FD;
    }
    if (!isPort(o.hostPort) || !isPort(o.containerPort)) {
        say("-host-port %s or -container-port %s is not a port (1-65535)", o.hostPort,
            o.containerPort);
        report(0);
        return 1;
    }

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    signals = signalfd(-1, &stop, SFD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)getpid() ^ (unsigned)nowMs());

    enum outcome first = publish(&o, listenFd, 0);
    report(first == PUBLISHED);
    if (first != PUBLISHED)
        return 1;

    /*
     * The lease.  With -use-listen-fd, descriptor 4 stays open: after a
     * daemon restart it is passed again, and meanwhile the kernel queues
     * connections on it.
     */
    int delay = RETRY_FIRST_MS;
    for (;;) {
        if (control >= 0) {
            if (holdLease())
                break;
            delay = RETRY_FIRST_MS;
            continue;
        }
        if (pause_(delay))
            break;
        enum outcome again = publish(&o, listenFd, 1);
        if (again == STOPPED)
            break;
        if (again == PUBLISHED)
            continue;
        if (again == REFUSED) {
            fprintf(stderr, "portproxy-docker-proxy: %s\n", problem);
            delay = RETRY_REFUSED_MS;
        } else {
            delay = delay * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : delay * 2;
        }
    }
    unpublish();
    return 0;
}
