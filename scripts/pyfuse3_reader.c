/* lazyfs: reader thread */
/* Inserted into pyfuse3's generated C by scripts/pyfuse3_cache_dir.py (see its docstring).
   One thread reads /dev/fuse without the GIL; what needs no Python it hands straight to
   libfuse (whose low-level session is made for several threads), the rest it queues for
   pyfuse3's trio workers, woken through an eventfd that stands in for the session fd. */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/uio.h>

/* The kernel's request header (linux/fuse.h), spelled out: that header clashes with libfuse's. */
struct lazyfs_in_header {
  uint32_t len, opcode;
  uint64_t unique, nodeid;
  uint32_t uid, gid, pid;
  uint16_t total_extlen, padding;
};
enum { LAZYFS_LOOKUP = 1, LAZYFS_GETATTR = 3, LAZYFS_READLINK = 5, LAZYFS_READ = 15,
       LAZYFS_GETXATTR = 22, LAZYFS_IOCTL = 39, LAZYFS_READDIRPLUS = 44 };
/* The reply header (linux/fuse.h's fuse_out_header). */
struct lazyfs_out_header {
  uint32_t len;
  int32_t error;
  uint64_t unique;
};

/* lazyfs: no capability */
/* Set by lazyfs (ctypes) while no file of the mount can have a security.capability xattr: the
   kernel asks for it before every write(2) to a file (file_remove_privs), and the reader then
   answers ENODATA here, without Python.  lazyfs clears it before any such xattr is set. */
int lazyfs_no_capability = 0;
static const char lazyfs_capability[] = "security.capability";

/* lazyfs: fast path */
/* LOOKUP, GETATTR, READLINK, READ and READDIRPLUS answered by a Python function called here,
   in the reader thread, instead of queued for a trio worker: no eventfd wake-up of the trio
   thread, no trip through trio's scheduler and pyfuse3's worker (~70 us of a LOOKUP's ~90).
   Only while trio's thread waits for events: it holds lazyfs_trio_lock whenever it runs tasks
   (a trio instrument in lazyfs.fs.fastpath takes it after and gives it back before each wait
   for I/O), and the reader serves a request only if it gets the lock at once, so the function
   runs as if it were one more task between two of trio's steps: no task is ever seen
   half-way between two awaits.  The function answers bytes (the reply), an int (an errno) or None
   (queue it after all: it needs trio).  Set and cleared under the lock. */
static pthread_mutex_t lazyfs_trio_lock = PTHREAD_MUTEX_INITIALIZER;
static int lazyfs_trio_wants;       /* the trio thread waits for the lock: leave it alone */
static PyObject *lazyfs_fast_fn;    /* a strong reference, or NULL */
static int lazyfs_reader_gil;       /* the reader thread made its Python thread state */
static PyGILState_STATE lazyfs_reader_gil_first;
unsigned long lazyfs_reader_fast = 0;  /* requests answered by the fast function */
/* The kernel's protocol minor, set at FUSE_INIT (the cache_symlinks patch): the replies
   below are laid out for 7.9 and later. */
extern int lazyfs_proto_minor;

/* The trio thread, after waiting for events (blocking: through ctypes.CDLL, without the GIL,
   which the reader may need to finish). */
void lazyfs_trio_enter(void) {
  __atomic_store_n(&lazyfs_trio_wants, 1, __ATOMIC_RELEASE);
  pthread_mutex_lock(&lazyfs_trio_lock);
  __atomic_store_n(&lazyfs_trio_wants, 0, __ATOMIC_RELEASE);
}

/* The same, without blocking (through ctypes.PyDLL, with the GIL): 1 if taken. */
int lazyfs_trio_try_enter(void) { return pthread_mutex_trylock(&lazyfs_trio_lock) == 0; }

/* The trio thread, before waiting for events. */
void lazyfs_trio_leave(void) { pthread_mutex_unlock(&lazyfs_trio_lock); }

/* Through ctypes.PyDLL (with the GIL) by the trio thread holding the lock: fn or None. */
void lazyfs_set_fast(PyObject *fn) {
  PyObject *old = lazyfs_fast_fn;
  if (fn == Py_None) fn = NULL;
  Py_XINCREF(fn);
  lazyfs_fast_fn = fn;
  Py_XDECREF(old);
}

static int lazyfs_fast_op(uint32_t op) {
  return op == LAZYFS_LOOKUP || op == LAZYFS_GETATTR || op == LAZYFS_READLINK
         || op == LAZYFS_READ || op == LAZYFS_READDIRPLUS;
}

/* 1 if the request was answered here. */
static int lazyfs_try_fast(int fd, const char *mem, size_t size) {
  const struct lazyfs_in_header *h = (const struct lazyfs_in_header *)mem;
  PyObject *args[3] = {NULL, NULL, NULL}, *res = NULL;
  PyGILState_STATE g;
  int done = 0;
  if (!lazyfs_fast_op(h->opcode) || !__atomic_load_n(&lazyfs_fast_fn, __ATOMIC_ACQUIRE)
      || __atomic_load_n(&lazyfs_trio_wants, __ATOMIC_ACQUIRE) || lazyfs_proto_minor < 9)
    return 0;
  if (pthread_mutex_trylock(&lazyfs_trio_lock) != 0) return 0;
  if (!lazyfs_fast_fn) {  /* cleared meanwhile */
    pthread_mutex_unlock(&lazyfs_trio_lock);
    return 0;
  }
  g = PyGILState_Ensure();
  if (!lazyfs_reader_gil) {  /* keep the thread state for the thread's life */
    lazyfs_reader_gil_first = PyGILState_Ensure();
    lazyfs_reader_gil = 1;
  }
  args[0] = PyLong_FromUnsignedLong(h->opcode);
  args[1] = PyLong_FromUnsignedLongLong(h->nodeid);
  args[2] = PyBytes_FromStringAndSize(mem + sizeof *h, (Py_ssize_t)(size - sizeof *h));
  if (args[0] && args[1] && args[2])
    res = PyObject_Vectorcall(lazyfs_fast_fn, args, 3, NULL);
  if (!res) {
    PyErr_WriteUnraisable(lazyfs_fast_fn);  /* a bug: the queue's handler answers instead */
  } else if (res != Py_None) {
    struct lazyfs_out_header out = {sizeof out, 0, h->unique};
    struct iovec iov[2] = {{&out, sizeof out}, {NULL, 0}};
    int n = 1;
    if (PyBytes_Check(res)) {
      iov[1].iov_base = PyBytes_AS_STRING(res);
      iov[1].iov_len = (size_t)PyBytes_GET_SIZE(res);
      out.len += (uint32_t)iov[1].iov_len;
      n = 2;
      done = 1;
    } else if (PyLong_Check(res)) {
      out.error = -(int32_t)PyLong_AsLong(res);
      done = out.error < 0;
    }
    if (done) {
      /* A failure means the request was interrupted or the mount is going: nothing to do. */
      ssize_t ignored = writev(fd, iov, n);
      (void)ignored;
    }
    PyErr_Clear();
  }
  Py_XDECREF(res);
  Py_XDECREF(args[0]);
  Py_XDECREF(args[1]);
  Py_XDECREF(args[2]);
  PyGILState_Release(g);
  pthread_mutex_unlock(&lazyfs_trio_lock);
  if (done) __atomic_add_fetch(&lazyfs_reader_fast, 1, __ATOMIC_RELAXED);
  return done;
}

/* At the reader thread's end: its Python thread state goes (needs the GIL). */
static void lazyfs_reader_drop_gil_state(void) {
  if (!lazyfs_reader_gil) return;
  PyGILState_STATE g = PyGILState_Ensure();  /* current: the last release deletes it */
  PyGILState_Release(lazyfs_reader_gil_first);
  PyGILState_Release(g);
  lazyfs_reader_gil = 0;
}

struct lazyfs_queued {
  struct lazyfs_queued *next;
  char *mem;
  size_t size;
};

static pthread_t lazyfs_reader;
static int lazyfs_reader_running;  /* started, not yet joined */
static int lazyfs_reader_used;     /* the workers take requests from the queue */
static int lazyfs_queue_fd = -1;   /* readable while requests wait or once the reader ended */
static int lazyfs_stop_fd = -1;
static pthread_mutex_t lazyfs_queue_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lazyfs_queued *lazyfs_head, *lazyfs_tail;
static int lazyfs_reader_ended;
static int lazyfs_reader_result;   /* what receive answers once ended: 0 or -errno */
/* Requests answered in the reader and handed to Python (read through ctypes, for stats). */
unsigned long lazyfs_reader_answered = 0;
unsigned long lazyfs_reader_handed = 0;

static void lazyfs_wake(void) {
  uint64_t one = 1;
  ssize_t ignored = write(lazyfs_queue_fd, &one, sizeof one);
  (void)ignored;
}

static void lazyfs_finish(int result) {
  pthread_mutex_lock(&lazyfs_queue_lock);
  lazyfs_reader_ended = 1;
  lazyfs_reader_result = result;
  lazyfs_wake();
  pthread_mutex_unlock(&lazyfs_queue_lock);
}

static int lazyfs_answer_in_c(const char *mem, size_t size) {
  const struct lazyfs_in_header *h = (const struct lazyfs_in_header *)mem;
  (void)size;
  /* pyfuse3 has no ioctl handler: libfuse answers ENOSYS.  (OPENDIR and OPEN come once each:
     lazyfs answers ENOSYS, and the kernel sends neither again.) */
  return h->opcode == LAZYFS_IOCTL;
}

/* A GETXATTR of security.capability while lazyfs_no_capability is set: the name follows the
   header and fuse_getxattr_in (size, padding). */
static int lazyfs_no_such_capability(const char *mem, size_t size) {
  const struct lazyfs_in_header *h = (const struct lazyfs_in_header *)mem;
  size_t at = sizeof *h + 8;
  if (h->opcode != LAZYFS_GETXATTR || !__atomic_load_n(&lazyfs_no_capability, __ATOMIC_ACQUIRE))
    return 0;
  return size >= at + sizeof lazyfs_capability
         && memcmp(mem + at, lazyfs_capability, sizeof lazyfs_capability) == 0;
}

static void *lazyfs_reader_main(void *arg) {
  struct fuse_session *se = (struct fuse_session *)arg;
  int fd = fuse_session_fd(se);
  /* Big enough for any request: libfuse's own buffer is 256 pages and a header page. */
  size_t bufsize = 257 * (size_t)sysconf(_SC_PAGESIZE);
  char *buf = (char *)malloc(bufsize);
  struct pollfd fds[2] = {{fd, POLLIN, 0}, {lazyfs_stop_fd, POLLIN, 0}};
  if (!buf) { lazyfs_finish(-ENOMEM); return NULL; }
  for (;;) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      lazyfs_finish(-errno);
      break;
    }
    if (fds[1].revents) { lazyfs_finish(0); break; }  /* close(): stop */
    ssize_t n = read(fd, buf, bufsize);
    if (n < 0) {
      int e = errno;
      if (e == EINTR || e == EAGAIN || e == ENOENT) continue;  /* ENOENT: interrupted */
      if (e == ENODEV) {  /* unmounted or aborted */
        fuse_session_exit(se);
        lazyfs_finish(0);
      } else {
        lazyfs_finish(-e);
      }
      break;
    }
    if ((size_t)n < sizeof(struct lazyfs_in_header)) { lazyfs_finish(-EIO); break; }
    if (lazyfs_no_such_capability(buf, (size_t)n)) {
      struct lazyfs_out_header out = {sizeof out, -ENODATA,
                                       ((const struct lazyfs_in_header *)buf)->unique};
      /* A failure means the request was interrupted or the mount is going: nothing to do. */
      ssize_t ignored = write(fd, &out, sizeof out);
      (void)ignored;
      __atomic_add_fetch(&lazyfs_reader_answered, 1, __ATOMIC_RELAXED);
      continue;
    }
    if (lazyfs_try_fast(fd, buf, (size_t)n)) continue;
    if (lazyfs_answer_in_c(buf, (size_t)n)) {
      struct fuse_buf fb = {0};
      fb.size = (size_t)n;
      fb.mem = buf;
      fb.fd = -1;
      fuse_session_process_buf(se, &fb);
      __atomic_add_fetch(&lazyfs_reader_answered, 1, __ATOMIC_RELAXED);
      continue;
    }
    /* Copied: a request is small but for writes, and the big buffer is reused at once. */
    struct lazyfs_queued *q = (struct lazyfs_queued *)malloc(sizeof *q);
    char *mem = (char *)malloc((size_t)n);
    if (!q || !mem) { free(q); free(mem); lazyfs_finish(-ENOMEM); break; }
    memcpy(mem, buf, (size_t)n);
    q->next = NULL;
    q->mem = mem;
    q->size = (size_t)n;
    pthread_mutex_lock(&lazyfs_queue_lock);
    if (lazyfs_tail) lazyfs_tail->next = q; else lazyfs_head = q;
    lazyfs_tail = q;
    lazyfs_wake();
    pthread_mutex_unlock(&lazyfs_queue_lock);
    __atomic_add_fetch(&lazyfs_reader_handed, 1, __ATOMIC_RELAXED);
  }
  free(buf);
  lazyfs_reader_drop_gil_state();
  return NULL;
}

/* In place of fuse_session_receive_buf for pyfuse3's workers: the next queued request (its
   buffer replaces the worker's, which frees it as it frees its own), -EINTR when another
   worker took it first (the worker waits again), or the reader's end. */
static int lazyfs_receive_buf(struct fuse_session *se, struct fuse_buf *buf) {
  struct lazyfs_queued *q;
  int res;
  uint64_t count;
  if (!lazyfs_reader_used) return fuse_session_receive_buf(se, buf);
  pthread_mutex_lock(&lazyfs_queue_lock);
  q = lazyfs_head;
  if (q) {
    lazyfs_head = q->next;
    if (!lazyfs_head) lazyfs_tail = NULL;
  }
  /* Empty: not readable until the next request (the reader writes under this lock too). */
  if (!lazyfs_head && !lazyfs_reader_ended) {
    ssize_t ignored = read(lazyfs_queue_fd, &count, sizeof count);
    (void)ignored;
  }
  res = q ? 0 : lazyfs_reader_ended ? lazyfs_reader_result : -EINTR;
  pthread_mutex_unlock(&lazyfs_queue_lock);
  if (q) {
    free(buf->mem);
    buf->mem = q->mem;
    buf->size = q->size;
    buf->flags = (enum fuse_buf_flags)0;
    buf->pos = 0;
    res = (int)q->size;
    free(q);
  }
  return res;
}

/* Joins the reader (if running) and drops what it queued; the workers' fd stays the eventfd,
   readable, so that a worker still waiting sees the end. */
void lazyfs_reader_stop(void) {
  uint64_t one = 1;
  struct lazyfs_queued *q;
  if (!lazyfs_reader_running) return;
  ssize_t ignored = write(lazyfs_stop_fd, &one, sizeof one);
  (void)ignored;
  if (PyGILState_Check()) {  /* the reader may need the GIL to end (its thread state) */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(lazyfs_reader, NULL);
    Py_END_ALLOW_THREADS
  } else {
    pthread_join(lazyfs_reader, NULL);
  }
  lazyfs_reader_running = 0;
  close(lazyfs_stop_fd);
  lazyfs_stop_fd = -1;
  pthread_mutex_lock(&lazyfs_queue_lock);
  while ((q = lazyfs_head) != NULL) {
    lazyfs_head = q->next;
    free(q->mem);
    free(q);
  }
  lazyfs_tail = NULL;
  pthread_mutex_unlock(&lazyfs_queue_lock);
  lazyfs_reader_used = 0;  /* a later session reads its fd itself unless started again */
}

/* After pyfuse3.init(), before main(): 0, or -errno (then nothing changed). */
int lazyfs_reader_start(void) {
  struct fuse_session *se = __pyx_v_7pyfuse3_session;
  sigset_t all, old;
  int fd, flags, err;
  if (!se) return -EINVAL;
  if (lazyfs_reader_running) return -EBUSY;
  fd = fuse_session_fd(se);
  if (lazyfs_queue_fd >= 0) close(lazyfs_queue_fd);  /* a former session's */
  lazyfs_queue_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  lazyfs_stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  flags = fcntl(fd, F_GETFL);
  if (lazyfs_queue_fd < 0 || lazyfs_stop_fd < 0 || flags < 0
      || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    err = -errno;
    goto fail;
  }
  lazyfs_head = lazyfs_tail = NULL;
  lazyfs_reader_ended = 0;
  lazyfs_reader_result = 0;
  /* Signals stay with Python's main thread (and never interrupt the reader). */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  err = -pthread_create(&lazyfs_reader, NULL, lazyfs_reader_main, se);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (err) {
    fcntl(fd, F_SETFL, flags);
    goto fail;
  }
  lazyfs_reader_running = 1;
  lazyfs_reader_used = 1;
  __pyx_v_7pyfuse3_session_fd = lazyfs_queue_fd;
  return 0;
fail:
  if (lazyfs_queue_fd >= 0) close(lazyfs_queue_fd);
  if (lazyfs_stop_fd >= 0) close(lazyfs_stop_fd);
  lazyfs_queue_fd = lazyfs_stop_fd = -1;
  return err;
}

