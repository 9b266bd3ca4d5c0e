// The wait between reconnects: exponential backoff with full jitter, which can be cut short.

export class Backoff {
  #baseMs;
  #maxMs;
  /** @type {(() => void) | null} */
  #wake = null;

  /**
   * @param {number} baseMs the bound of the first wait
   * @param {number} maxMs the bound doubles up to this
   */
  constructor(baseMs, maxMs) {
    this.#baseMs = baseMs;
    this.#maxMs = maxMs;
  }

  /**
   * Anywhere from 0 to `min(maxMs, baseMs * 2 ** (failures - 1))`: full jitter, so clients that
   * lost the same server do not come back at the same moment.
   * @param {number} failures
   */
  delay(failures) {
    return Math.random() * Math.min(this.#maxMs, this.#baseMs * 2 ** (failures - 1));
  }

  /**
   * Wait `delay(failures)`, or until `wake()`.
   * @param {number} failures
   * @returns {Promise<void>}
   */
  wait(failures) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#wake = null;
        resolve();
      };
      const timer = setTimeout(done, this.delay(failures));
      this.#wake = done;
    });
  }

  /** End the current wait now (the network came back, or the client closed). */
  wake() {
    this.#wake?.();
  }
}
