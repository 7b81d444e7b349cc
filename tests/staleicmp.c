/*
 * An LD_PRELOAD library for the tests: the first send on each UDP socket
 * connected to port $STALE_ICMP_PORT fails with ECONNREFUSED and sends
 * nothing, as a send does that meets the ICMP port-unreachable error an
 * earlier datagram left on the socket.  Loopback delivers such an error at
 * once, so that the proxy reads it off the socket before its next send; a
 * remote target's error can arrive between two sends, which this stands
 * for.  Wraps send, sendto, sendmsg and sendmmsg, whatever sends a
 * session's datagrams on either path.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>

#define MAX_FD 65536

static atomic_uchar refused[MAX_FD];

/* Whether this send on fd is the one to refuse (errno set). */
static int
refuseOnce(int fd)
{
    const char *wanted = getenv("STALE_ICMP_PORT");
    if (wanted == NULL || fd < 0 || fd >= MAX_FD || atomic_load(&refused[fd]))
        return 0;
    int type;
    socklen_t typeLen = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &typeLen) < 0 || type != SOCK_DGRAM)
        return 0;
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) < 0)
        return 0;
    int port = -1;
    if (peer.ss_family == AF_INET)
        port = ntohs(((struct sockaddr_in *)&peer)->sin_port);
    else if (peer.ss_family == AF_INET6)
        port = ntohs(((struct sockaddr_in6 *)&peer)->sin6_port);
    if (port != atoi(wanted) || atomic_exchange(&refused[fd], 1))
        return 0;
    errno = ECONNREFUSED;
    return 1;
}

ssize_t
send(int fd, const void *buf, size_t len, int flags)
{
    static ssize_t (*real)(int, const void *, size_t, int);
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "send");
    return refuseOnce(fd) ? -1 : real(fd, buf, len, flags);
}

ssize_t
sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to,
       socklen_t toLen)
{
    static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *,
                           socklen_t);
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "sendto");
    return refuseOnce(fd) ? -1 : real(fd, buf, len, flags, to, toLen);
}

ssize_t
sendmsg(int fd, const struct msghdr *msg, int flags)
{
    static ssize_t (*real)(int, const struct msghdr *, int);
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "sendmsg");
    return refuseOnce(fd) ? -1 : real(fd, msg, flags);
}

int
sendmmsg(int fd, struct mmsghdr *msgs, unsigned int count, int flags)
{
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "sendmmsg");
    return refuseOnce(fd) ? -1 : real(fd, msgs, count, flags);
}
