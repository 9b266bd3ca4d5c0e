// Copy the client's modules into the Python package, which serves them at /client/.
// The Python tests check that the copy matches src/.
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, "..", "src");
const target = join(here, "..", "..", "..", "backstream", "web", "client");
mkdirSync(target, { recursive: true });
for (const name of readdirSync(target)) if (name.endsWith(".js")) rmSync(join(target, name));
for (const name of readdirSync(source)) {
  if (name.endsWith(".js")) copyFileSync(join(source, name), join(target, name));
}
console.log(`copied ${source} to ${target}`);
