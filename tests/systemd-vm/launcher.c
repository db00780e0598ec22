/*
 * A stand-in for desktop programs in the systemd VM tests: copied under the
 * names the policy matches (steam, reaper, game.x86_64, nvim, rust-analyzer,
 * blender), it gives real exe paths and comm values, and it can start the
 * next program of a chain the way the real one would.
 *
 *   steam reaper SteamLaunch AppId=570 -- game.x86_64
 *
 * Each copy keeps its own arguments up to the first one that names an
 * executable (a path with a '/', or a name found on $PATH), forks, execs
 * that one with the rest of argv, and then waits forever, reaping children.
 * So the above runs `steam` (argv: steam reaper SteamLaunch ...), which
 * starts `reaper` (argv: reaper SteamLaunch AppId=570 -- game.x86_64), which
 * starts `game.x86_64`. With no executable among its arguments a copy just
 * waits (`blender -b scene.blend -a`). A copy named `reaper` also becomes a
 * child subreaper, as Steam's does.
 *
 * Built statically on the host: gcc -static -O2 -o launcher launcher.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int is_executable(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* Resolves `name` like execvp would; writes the path to `out`. */
static int resolve(const char *name, char *out, size_t len)
{
    if (strchr(name, '/')) {
        if (!is_executable(name))
            return 0;
        snprintf(out, len, "%s", name);
        return 1;
    }
    const char *path = getenv("PATH");
    if (!path || !*name)
        return 0;
    char *dirs = strdup(path);
    if (!dirs)
        return 0;
    int found = 0;
    for (char *save = NULL, *dir = strtok_r(dirs, ":", &save); dir;
         dir = strtok_r(NULL, ":", &save)) {
        snprintf(out, len, "%s/%s", dir, name);
        if (is_executable(out)) {
            found = 1;
            break;
        }
    }
    free(dirs);
    return found;
}

int main(int argc, char **argv)
{
    const char *self = strrchr(argv[0], '/');
    self = self ? self + 1 : argv[0];
    if (strcmp(self, "reaper") == 0)
        prctl(PR_SET_CHILD_SUBREAPER, 1);

    char path[PATH_MAX];
    for (int i = 1; i < argc; i++) {
        if (!resolve(argv[i], path, sizeof path))
            continue;
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "%s: fork: %s\n", self, strerror(errno));
            return 1;
        }
        if (pid == 0) {
            execv(path, &argv[i]);
            fprintf(stderr, "%s: exec %s: %s\n", self, path, strerror(errno));
            _exit(127);
        }
        break;
    }
    /* Wait forever: reap children (and, as a subreaper, orphans) while there
     * are any, then sleep until killed. */
    for (;;) {
        if (wait(NULL) < 0 && errno == ECHILD)
            pause();
    }
}
