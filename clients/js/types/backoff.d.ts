export class Backoff {
    /**
     * @param {number} baseMs the bound of the first wait
     * @param {number} maxMs the bound doubles up to this
     */
    constructor(baseMs: number, maxMs: number);
    /**
     * Anywhere from 0 to `min(maxMs, baseMs * 2 ** (failures - 1))`: full jitter, so clients that
     * lost the same server do not come back at the same moment.
     * @param {number} failures
     */
    delay(failures: number): number;
    /**
     * Wait `delay(failures)`, or until `wake()`.
     * @param {number} failures
     * @returns {Promise<void>}
     */
    wait(failures: number): Promise<void>;
    /** End the current wait now (the network came back, or the client closed). */
    wake(): void;
    #private;
}
