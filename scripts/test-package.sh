#!/usr/bin/env bash
# Checks the Debian package: builds it with scripts/package.sh (which fails on any lintian
# error), or takes the .deb given as $1, then checks with dpkg-deb -c/-I/-x:
#   - the file list, owners and modes;
#   - the control fields (version = the packaged `balloond --version`; Depends covers every
#     library `ldd` shows the binary loading directly), conffiles, md5sums;
#   - the systemd unit (ExecStart with $BALLOOND_OPTS from /etc/default/balloond,
#     Restart=on-failure, the runtime directory, stop signal and timeout, the hardening it
#     has and the settings it must not have), the modules-load.d entry, /etc/default/balloond,
#     the manual page.
# Run by scripts/test.sh. Exits non-zero with one line per failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ge 1 ]; then DEB=$1; else DEB=$(scripts/package.sh | tail -n1); fi
[ -f "$DEB" ] || { echo "test-package: no package at '$DEB'" >&2; exit 1; }
X=$(mktemp -d /tmp/balloond-deb-test.XXXXXX)
trap 'rm -rf "$X"' EXIT

failures=0
fail() { echo "test-package: FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "test-package: ok: $*" >&2; }

# --- file list, owners, modes (dpkg-deb -c) ----------------------------------------------
dpkg-deb -c "$DEB" | awk '{print $1, $2, $6}' | sed 's| \./| /|; s|/$||' | LC_ALL=C sort >"$X/list"
cat >"$X/expected" <<'EOF'
-rw-r--r-- root/root /etc/default/balloond
-rw-r--r-- root/root /usr/lib/modules-load.d/balloond.conf
-rw-r--r-- root/root /usr/lib/systemd/system/balloond.service
-rw-r--r-- root/root /usr/share/doc/balloond/changelog.gz
-rw-r--r-- root/root /usr/share/doc/balloond/copyright
-rw-r--r-- root/root /usr/share/man/man8/balloond.8.gz
-rwxr-xr-x root/root /usr/sbin/balloond
EOF
grep -v '^d' "$X/list" >"$X/files" || true
if diff -u "$X/expected" "$X/files" >"$X/diff"; then ok "file list"; else fail "file list differs:"; cat "$X/diff" >&2; fi
if grep '^d' "$X/list" | grep -qv '^drwxr-xr-x root/root'; then fail "a directory is not drwxr-xr-x root/root"; else ok "directories 0755 root"; fi

# --- control (dpkg-deb -I) -----------------------------------------------------------------
dpkg-deb -x "$DEB" "$X/root"
dpkg-deb -e "$DEB" "$X/DEBIAN"
field() { dpkg-deb -f "$DEB" "$1"; }
version=$("$X/root/usr/sbin/balloond" --version) || fail "the packaged binary does not run"
[ "$(field Package)" = balloond ] && ok "Package" || fail "Package is '$(field Package)'"
[ "$(field Version)" = "$version" ] && ok "Version $version" || fail "Version '$(field Version)' is not balloond --version '$version'"
[ "$(field Architecture)" = amd64 ] && ok "Architecture" || fail "Architecture is '$(field Architecture)'"
[[ "$DEB" == *"/balloond_${version}_amd64.deb" ]] && ok "file name" || fail "file name $DEB is not balloond_${version}_amd64.deb"
for f in Maintainer Section Priority Description Installed-Size; do [ -n "$(field $f)" ] || fail "no $f field"; done
depends=$(field Depends)
for lib in libc6 libpci3 zlib1g; do
  [[ ", $depends" == *", $lib "* ]] && ok "Depends has $lib" || fail "Depends ($depends) lacks $lib"
done
# Every library the binary loads directly comes from a package in Depends.
if ldd "$X/root/usr/sbin/balloond" | grep -q 'not found'; then fail "ldd: libraries not found: $(ldd "$X/root/usr/sbin/balloond" | grep 'not found')"; fi
for so in $(readelf -d "$X/root/usr/sbin/balloond" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  case $so in ld-linux*) continue ;; esac
  path=$(ldd "$X/root/usr/sbin/balloond" | awk -v so="$so" '$1 == so {print $3}')
  pkg=$( (dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null) | head -n1 | cut -d: -f1)
  if [ -z "$pkg" ]; then fail "$so ($path) belongs to no installed package"
  elif [[ ", $depends" == *", $pkg "* || ", $depends" == *", $pkg,"* ]]; then ok "$so from $pkg, in Depends"
  else fail "$so comes from $pkg, which Depends ($depends) lacks"; fi
done
if readelf -d "$X/root/usr/sbin/balloond" | grep -qE 'RPATH|RUNPATH'; then fail "the binary has an rpath/runpath"; else ok "no rpath"; fi
if file "$X/root/usr/sbin/balloond" | grep -q 'not stripped'; then fail "the binary is not stripped"; else ok "stripped"; fi

[ "$(cat "$X/DEBIAN/conffiles")" = /etc/default/balloond ] && ok "conffiles" || fail "conffiles is '$(cat "$X/DEBIAN/conffiles")'"
if (cd "$X/root" && md5sum --quiet -c "$X/DEBIAN/md5sums") && [ "$(wc -l <"$X/DEBIAN/md5sums")" = "$(grep -c -v '^d' "$X/list")" ]; then
  ok "md5sums"
else fail "md5sums do not match the files"; fi
for s in postinst prerm postrm; do
  [ -x "$X/DEBIAN/$s" ] && sh -n "$X/DEBIAN/$s" && grep -q "balloond.service" "$X/DEBIAN/$s" && ok "$s" || fail "$s missing, not executable or not about balloond.service"
done

# --- the unit -------------------------------------------------------------------------------
unit=$X/root/usr/lib/systemd/system/balloond.service
for line in 'ExecStart=/usr/sbin/balloond run $BALLOOND_OPTS' 'EnvironmentFile=-/etc/default/balloond' 'Restart=on-failure' \
  'RuntimeDirectory=balloond' 'RuntimeDirectoryMode=0700' 'KillSignal=SIGTERM' 'KillMode=process' 'NoNewPrivileges=yes' 'ProtectHome=yes' \
  'PrivateTmp=yes' 'RestrictAddressFamilies=AF_UNIX' 'WantedBy=multi-user.target' 'Documentation=man:balloond(8)'; do
  grep -qxF "$line" "$unit" && ok "unit: $line" || fail "unit lacks the line '$line'"
done
grep -qE '^TimeoutStopSec=[0-9]+' "$unit" && ok "unit: TimeoutStopSec" || fail "unit has no TimeoutStopSec"
# Settings that would stop balloond from binding uio, writing sysfs/sysctls, loading modules
# or reading /dev/kmsg and /dev/uioN.
for bad in ProtectKernelTunables ProtectKernelModules ProtectKernelLogs ProtectClock PrivateDevices DeviceAllow DevicePolicy \
  'ProtectSystem=strict' ReadOnlyPaths InaccessiblePaths 'User=' DynamicUser CapabilityBoundingSet; do
  if grep -E '^[^#]' "$unit" | grep -q "^$bad"; then fail "unit sets $bad"; else ok "unit: no $bad"; fi
done

# --- modules-load.d, the default file, the manual ---------------------------------------------
[ "$(grep -v '^#' "$X/root/usr/lib/modules-load.d/balloond.conf")" = uio_pci_generic ] && ok "modules-load.d: uio_pci_generic" ||
  fail "modules-load.d/balloond.conf does not load exactly uio_pci_generic"
# As systemd reads it: BALLOOND_OPTS set (empty by default), nothing else.
opts=$(env -i sh -c '. "$1"; printf "%s|%s" "${BALLOOND_OPTS-unset}" "$(set | grep -c "^BALLOOND_")"' sh "$X/root/etc/default/balloond")
[ "$opts" = "|1" ] && ok "/etc/default/balloond: BALLOOND_OPTS empty" || fail "/etc/default/balloond gives BALLOOND_OPTS|count = '$opts'"
man=$(zcat "$X/root/usr/share/man/man8/balloond.8.gz") || fail "the manual page is not gzip"
grep -q '^\.Dt BALLOOND 8' <<<"$man" && ok "manual: balloond(8)" || fail "the manual page is not balloond(8)"
grep -q 'metrics-textfile' <<<"$man" && grep -q 'format' <<<"$man" && ok "manual: documents run and status options" ||
  fail "the manual page lacks --metrics-textfile/--format"
[ "$(zcat "$X/root/usr/share/doc/balloond/changelog.gz" | sed -nE '1s/^balloond \(([^)]+)\).*/\1/p')" = "$version" ] &&
  ok "changelog: $version" || fail "changelog's top entry is not $version"

if [ "$failures" -gt 0 ]; then
  echo "test-package: $failures check(s) failed for $DEB" >&2
  exit 1
fi
echo "test-package: all checks passed for $DEB" >&2
