/* execl, execlp and execle for GuestLib (exported by the Rust trampolines in exec_l.rs). glibc's
 * own gather their variadic arguments and call its internal __execve, which LD_PRELOAD cannot
 * intercept, so sockets inherited through them would not be handed to the new program. These
 * gather the arguments the same way and call execv, execvp and execve, which GuestLib
 * interposes. (Variadic functions cannot be defined in stable Rust, hence C.) */
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

/* Counts the arguments after `first` up to the terminating NULL. */
static size_t count_args(va_list ap) {
    size_t n = 1;
    while (va_arg(ap, const char *) != NULL)
        n++;
    return n;
}

#define GATHER(first, last_named, argv, n, ap)          \
    va_list ap;                                         \
    va_start(ap, last_named);                           \
    va_list count_ap;                                   \
    va_copy(count_ap, ap);                              \
    size_t n = count_args(count_ap);                    \
    va_end(count_ap);                                   \
    const char *argv[n + 1];                            \
    argv[0] = first;                                    \
    for (size_t i = 1; i <= n; i++)                     \
        argv[i] = va_arg(ap, const char *);

int nk_execl(const char *path, const char *arg, ...) {
    GATHER(arg, arg, argv, n, ap)
    va_end(ap);
    return execv(path, (char *const *)argv);
}

int nk_execlp(const char *file, const char *arg, ...) {
    GATHER(arg, arg, argv, n, ap)
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

int nk_execle(const char *path, const char *arg, ...) {
    GATHER(arg, arg, argv, n, ap)
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
