/*
 * The C floor for fastnet's pingpong benchmark: the cheapest round trip a
 * program can make over a socket, one write() and one read() per message.
 *
 *   _floor server tcp                 listen on 127.0.0.1:0, print READY <json address>
 *   _floor server unix PATH           listen on the AF_UNIX path PATH
 *   _floor client tcp PORT SIZE WARMUP SAMPLE REPEAT
 *   _floor client unix PATH SIZE WARMUP SAMPLE REPEAT
 *
 * The server echoes every SIZE-byte message of one client until EOF.  The
 * client runs WARMUP seconds of round trips to pick an iteration count that
 * lasts about SAMPLE seconds, then times REPEAT samples and prints them as
 * one JSON line, microseconds per round trip, the format the Python runner
 * reads from its own children.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("setsockopt(TCP_NODELAY)");
}

/* Read exactly n bytes; 0 on a clean EOF before the first byte.  On loopback
 * a small message arrives whole, so this is one read() per message; the loop
 * is only there for correctness. */
static int read_full(int fd, char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r == 0) {
            if (got == 0)
                return 0;
            fprintf(stderr, "short message: %zu of %zu bytes\n", got, n);
            exit(2);
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        got += (size_t)r;
    }
    return 1;
}

static void write_full(int fd, const char *buf, size_t n)
{
    size_t put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        put += (size_t)w;
    }
}

static int serve(const char *family, const char *path)
{
    int ls, fd;
    char buf[65536];
    if (strcmp(family, "tcp") == 0) {
        struct sockaddr_in sa;
        socklen_t len = sizeof sa;
        int one = 1;
        ls = socket(AF_INET, SOCK_STREAM, 0);
        if (ls < 0)
            die("socket");
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("bind");
        if (listen(ls, 1) < 0)
            die("listen");
        if (getsockname(ls, (struct sockaddr *)&sa, &len) < 0)
            die("getsockname");
        printf("READY [\"127.0.0.1\", %d]\n", ntohs(sa.sin_port));
    } else {
        struct sockaddr_un su;
        ls = socket(AF_UNIX, SOCK_STREAM, 0);
        if (ls < 0)
            die("socket");
        memset(&su, 0, sizeof su);
        su.sun_family = AF_UNIX;
        strncpy(su.sun_path, path, sizeof su.sun_path - 1);
        if (bind(ls, (struct sockaddr *)&su, sizeof su) < 0)
            die("bind");
        if (listen(ls, 1) < 0)
            die("listen");
        printf("READY \"%s\"\n", path);
    }
    fflush(stdout);
    fd = accept(ls, NULL, NULL);
    if (fd < 0)
        die("accept");
    if (strcmp(family, "tcp") == 0)
        nodelay(fd);
    /* The client's first message carries nothing but the size to echo. */
    {
        unsigned int size;
        if (!read_full(fd, (char *)&size, sizeof size))
            return 0;
        if (size == 0 || size > sizeof buf) {
            fprintf(stderr, "bad size %u\n", size);
            return 2;
        }
        while (read_full(fd, buf, size))
            write_full(fd, buf, size);
    }
    close(fd);
    close(ls);
    return 0;
}

static double run(int fd, char *buf, unsigned int size, long n)
{
    double t0 = now();
    for (long i = 0; i < n; i++) {
        write_full(fd, buf, size);
        read_full(fd, buf, size);
    }
    return now() - t0;
}

static int client(const char *family, const char *where, unsigned int size,
                  double warmup, double sample, int repeat)
{
    int fd;
    char buf[65536];
    if (size == 0 || size > sizeof buf) {
        fprintf(stderr, "bad size %u\n", size);
        return 2;
    }
    if (strcmp(family, "tcp") == 0) {
        struct sockaddr_in sa;
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sa.sin_port = htons((unsigned short)atoi(where));
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("connect");
        nodelay(fd);
    } else {
        struct sockaddr_un su;
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        memset(&su, 0, sizeof su);
        su.sun_family = AF_UNIX;
        strncpy(su.sun_path, where, sizeof su.sun_path - 1);
        if (connect(fd, (struct sockaddr *)&su, sizeof su) < 0)
            die("connect");
    }
    write_full(fd, (const char *)&size, sizeof size);
    memset(buf, 'x', size);

    /* Warm up in growing chunks until WARMUP seconds have passed; the rate
     * seen there sets the iteration count of each timed sample. */
    long done = 0, chunk = 64;
    double spent = 0.0;
    while (spent < warmup) {
        spent += run(fd, buf, size, chunk);
        done += chunk;
        if (chunk < 65536)
            chunk *= 2;
    }
    long n = (long)(sample * done / (spent > 0 ? spent : 1e-9));
    if (n < 100)
        n = 100;

    printf("{\"samples\": [");
    for (int r = 0; r < repeat; r++) {
        double t = run(fd, buf, size, n);
        printf("%s%.4f", r ? ", " : "", t / n * 1e6);
    }
    printf("], \"info\": {\"iterations\": %ld}}\n", n);
    fflush(stdout);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "server") == 0) {
        if (strcmp(argv[2], "tcp") == 0)
            return serve("tcp", NULL);
        if (strcmp(argv[2], "unix") == 0 && argc >= 4)
            return serve("unix", argv[3]);
    }
    if (argc >= 8 && strcmp(argv[1], "client") == 0)
        return client(argv[2], argv[3], (unsigned int)atoi(argv[4]),
                      atof(argv[5]), atof(argv[6]), atoi(argv[7]));
    fprintf(stderr,
            "usage: %s server tcp | server unix PATH |"
            " client tcp|unix PORT|PATH SIZE WARMUP SAMPLE REPEAT\n",
            argv[0]);
    return 2;
}
