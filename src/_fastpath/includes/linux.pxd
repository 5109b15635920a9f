# How the pumps sleep and wake: poll, epoll, eventfd and sched_yield (Linux).

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout)
    enum: EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLLIN, EPOLL_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<sched.h>" nogil:
    int sched_yield()
