#!/bin/sh
# Build a small OCI image in the current directory, from the host's own
# programs (no registry, no daemon): image.tar, the tar of an OCI image
# layout tagged "tiny", with two layers:
#   l1.tar.gz  dash (as sh), true, cat, ls, env, sleep and their libraries, any
#              program given as an argument and its libraries, and
#              /opt/tool/only-in-image (a script found nowhere else);
#              /etc/os-release ID=agentvm-test-image, /etc/passwd of its own
#   l2.tar     a whiteout of /usr/bin/ls, /opt/second-layer, and
#              $PAD_FILES small files under /opt/pad (default 0)
# The config's Env: PATH=/usr/bin:/opt/tool FOO=from-image HOME=/nope; its
# User: $IMAGE_USER (default none: root); $IMAGE_CONFIG_EXTRA, if set, is
# more of the config (',"WorkingDir":"/opt"' say). Its /etc/passwd has root and
# builder (1234, group 1300). With $ETC_LINK set, layer 2 also makes etc a
# symlink to it (an attack: the sandbox must not follow it).
# Used by the test suite (crates/cli/tests/suite/images.rs) and bench/images.py.
set -e
R=rootfs; L=layout
rm -rf $R two $L
mkdir -p $R/usr/bin $R/usr/lib $R/usr/lib64 $R/etc $R/opt/tool $L/blobs/sha256 two/usr/bin two/opt
ln -s usr/bin $R/bin; ln -s usr/lib $R/lib; ln -s usr/lib64 $R/lib64
for b in /usr/bin/dash /usr/bin/true /usr/bin/cat /usr/bin/ls /usr/bin/env /usr/bin/sleep "$@"; do
  case $b in /usr/bin/*) cp "$b" $R/usr/bin/ ;; esac
  for f in $(ldd "$b" | grep -o '/[^ ]*'); do
    d=$R$(dirname "$f" | sed 's|^/lib|/usr/lib|'); mkdir -p "$d"; cp "$(readlink -f "$f")" "$d/$(basename "$f")"
  done
done
ln -s dash $R/usr/bin/sh
printf '#!/bin/sh\necho "only in the image: FOO=$FOO BAR=$BAR"\n' > $R/opt/tool/only-in-image
chmod 755 $R/opt/tool/only-in-image
echo 'ID=agentvm-test-image' > $R/etc/os-release
printf 'root:x:0:0:image passwd:/:/bin/sh\nbuilder:x:1234:1300:image passwd:/home/builder:/bin/sh\n' > $R/etc/passwd
: > two/usr/bin/.wh.ls
# an attack image for the tests: layer 2 makes /etc a symlink
[ -n "${ETC_LINK:-}" ] && ln -s "$ETC_LINK" two/etc
echo second > two/opt/second-layer
n=${PAD_FILES:-0}
if [ "$n" -gt 0 ]; then
  mkdir -p two/opt/pad
  i=0; while [ $i -lt "$n" ]; do
    [ $((i % 1000)) -eq 0 ] && mkdir -p two/opt/pad/d$((i / 1000))
    echo "file $i" > two/opt/pad/d$((i / 1000))/f$i; i=$((i + 1))
  done
fi
tar -C $R -cf l1.tar . ; tar -C two -cf l2.tar .
gzip -kfn l1.tar
sum() { sha256sum "$1" | cut -d' ' -f1; }
for f in l1.tar.gz l2.tar; do cp $f $L/blobs/sha256/$(sum $f); done
printf '{"architecture":"amd64","os":"linux","config":{"User":"%s"%s,"Env":["PATH=/usr/bin:/opt/tool","FOO=from-image","HOME=/nope"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}' \
  "${IMAGE_USER:-}" "${IMAGE_CONFIG_EXTRA:-}" $(sum l1.tar) $(sum l2.tar) > config.json
cp config.json $L/blobs/sha256/$(sum config.json)
printf '{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s},{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  $(sum config.json) $(stat -c %s config.json) $(sum l1.tar.gz) $(stat -c %s l1.tar.gz) $(sum l2.tar) $(stat -c %s l2.tar) > manifest.json
cp manifest.json $L/blobs/sha256/$(sum manifest.json)
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"tiny"}}]}' \
  $(sum manifest.json) $(stat -c %s manifest.json) > $L/index.json
echo '{"imageLayoutVersion":"1.0.0"}' > $L/oci-layout
tar -C $L -cf image.tar .
chmod -R a+rX .
