/*
 * What twistedproxy's two compiled engines (_fastrelay.c, _fastudp.c)
 * share: the descriptors by which the reactor thread and an engine's
 * thread wake each other.
 *
 * Each engine has an epoll instance its thread waits on, an eventfd in
 * that set by which Python wakes the thread (commands, new work), and an
 * eventfd the reactor watches, by which the thread tells Python it has
 * something to report.
 */

#ifndef TWISTEDPROXY_ENGINE_H
#define TWISTEDPROXY_ENGINE_H

#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

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

/*
 * Open an engine's epoll instance and its two eventfds (non-blocking,
 * close-on-exec), with *wakeFd in the epoll set under wakeData.  0 on
 * success; -1 with a Python OSError set, the caller's dealloc closing
 * whatever did open (every descriptor it is given starts at -1).
 */
static int
openEngineDescriptors(int *epfd, int *wakeFd, int *notifyFd, epoll_data_t wakeData)
{
    *epfd = epoll_create1(EPOLL_CLOEXEC);
    *wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    *notifyFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (*epfd < 0 || *wakeFd < 0 || *notifyFd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data = wakeData};
    if (epoll_ctl(*epfd, EPOLL_CTL_ADD, *wakeFd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

#endif
